"""The drop-in Mixture-of-Experts layer: ``MoE(MoEConfig(...))``, ``MoE.from_hf``, ``patch_hf``.

The exports load on first use (PEP 562), so the packages below the layer (``quant``, ``all_to_all``,
``hypermoe``) import the core modules they need (``moe.config``, ``moe.experts``, ``moe.shuffle``,
``moe.kernels``) without pulling in ``moe.layer``, which imports them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moe.config import Activation, Backend, MoEConfig, Quant
    from moe.layer import MoE
    from moe.patch import patch_hf

_EXPORTS = {"Activation": "moe.config", "Backend": "moe.config", "MoEConfig": "moe.config", "Quant": "moe.config",
            "MoE": "moe.layer", "patch_hf": "moe.patch"}

__all__ = ["Activation", "Backend", "MoE", "MoEConfig", "Quant", "patch_hf"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
