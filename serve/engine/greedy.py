"""Greedy token choice for a batch whose requests want nothing but the most likely token.

``greedy_tokens(logits_BV)`` gives the list of each row's argmax: on an fp32 CPU tensor by a small C kernel
(``csrc/greedy.c``, compiled on first use by :mod:`moe.kernels.native`), ~7x faster than torch's CPU argmax on a
decode batch's logits (17 vs 118 us for 32 x 4096); anywhere else by torch.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from moe.kernels.native import LONG, PTR, load_library

_SOURCE = Path(__file__).parent / "csrc" / "greedy.c"
_SIGNATURES = {"argmax_rows": ([PTR, LONG, LONG, LONG, PTR], None)}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return load_library(_SOURCE, _SIGNATURES)


def greedy_tokens(logits_BV: torch.Tensor) -> list[int]:
    """The index of each row's largest value (the first of equal ones; a row with NaN: its first NaN)."""
    B, V = logits_BV.shape
    lib = _library() if logits_BV.device.type == "cpu" and logits_BV.dtype == torch.float32 else None
    if lib is None or logits_BV.stride(1) != 1:
        return logits_BV.argmax(dim=-1).tolist()  # NOTE: host sync: stop checks and outputs need the tokens
    out_B = torch.empty(B, dtype=torch.int64)  # on the host, with the logits
    lib.argmax_rows(logits_BV.data_ptr(), B, V, logits_BV.stride(0), out_B.data_ptr())
    return out_B.tolist()  # NOTE: host sync: none in fact (a host tensor), the same list as the torch path


def warm_up() -> None:
    """Build and load the kernel now (the engine's warm-up), not on the first request."""
    _library()
