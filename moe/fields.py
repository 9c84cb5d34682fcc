"""Field helpers for the config dataclasses of every package (the bottom floor: it imports nothing of ours)."""

from __future__ import annotations

import enum
from typing import Any, TypeVar

E = TypeVar("E", bound=enum.Enum)


def enum_field(kind: type[E], name: str, value: Any) -> E:
    """``kind(value)``, or a ``ValueError`` naming the config field, the value and the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in kind)
        raise ValueError(f"{name} ({value!r}) is not one of: {choices}") from None
