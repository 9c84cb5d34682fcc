"""Fused decoder-layer ops for fp32 CPU inference (``csrc/decode_ops.c``), each with its torch form.

At decode sizes a layer's RMSNorms, q/k norms and rotations are dozens of tiny torch ops whose dispatch costs more
than their arithmetic: torch's composite RMSNorm of a [32, 128] batch takes ~25 us, one rotation of q ~8 ops. The
C ops do the same math in one call each. ``fused(x)`` says whether a tensor takes them: fp32, on the CPU, outside
autograd, with the library built (compiled on first use by :mod:`moe.kernels.native`); otherwise callers use torch.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from moe.kernels.native import FLOAT, LONG, PTR, load_library

_SOURCE = Path(__file__).parent / "csrc" / "decode_ops.c"
_SIGNATURES = {
    "rms_norm": ([PTR, PTR, LONG, LONG, FLOAT, PTR], None),
    "qk_norm_rope": ([PTR, LONG, LONG, LONG, LONG, LONG, PTR, PTR, FLOAT, PTR, PTR, PTR, PTR], None),
}
MAX_HEAD_DIM = 1024  # the C ops' per-head scratch


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return load_library(_SOURCE, _SIGNATURES)


def fused(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled() \
        and _library() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` for an fp32 CPU ``x`` (any leading shape)."""
    x = x.contiguous()
    D = x.shape[-1]
    out = torch.empty_like(x)
    _library().rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), x.numel() // D, D, eps, out.data_ptr())
    return out


def qk_norm_rope(qkv_TX: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                 cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``[T, H, Dh]`` and keys ``[T, Hkv, Dh]`` of one qkv projection ``[T, (H + 2 Hkv) Dh]``: each head
    RMS-normed over ``Dh`` with its weight (None: not normed), then its first ``R`` dims rotated NeoX-style by
    the rows of ``cos_TR`` / ``sin_TR``."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim ({head_dim}) exceeds the fused op's {MAX_HEAD_DIM}")
    qkv_TX, cos_TR, sin_TR = qkv_TX.contiguous(), cos_TR.contiguous(), sin_TR.contiguous()
    T, R = qkv_TX.shape[0], cos_TR.shape[-1]
    q = torch.empty(T, num_heads, head_dim)  # on the host, with the fp32 CPU qkv
    k = torch.empty(T, num_kv_heads, head_dim)  # host, as above
    q_ptr = 0 if q_weight is None else q_weight.contiguous().data_ptr()
    k_ptr = 0 if k_weight is None else k_weight.contiguous().data_ptr()
    _library().qk_norm_rope(qkv_TX.data_ptr(), T, num_heads, num_kv_heads, head_dim, R, q_ptr or None,
                            k_ptr or None, eps, cos_TR.data_ptr(), sin_TR.data_ptr(), q.data_ptr(), k.data_ptr())
    return q, k
