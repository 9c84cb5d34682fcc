"""Decode attention read straight from the paged KV cache by a small C kernel (``csrc/paged_attention.c``).

The torch path gathers every decoding sequence's blocks into a padded copy (``index_select``) and then runs
SDPA over it: the context is read twice and written once per layer. The kernel reads each key and value row
once, shared by the query heads of its group, with no padding. fp32 CPU caches only; compiled on first use by
:mod:`moe.kernels.native`, like the MoE layer's CPU GEMMs; unavailable -> the torch backend.

:class:`CpuAttention`: the backend that uses it for decodes (SDPA for prefill chunks, as the torch backend).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from moe.kernels.native import FLOAT, INT, LONG, PTR, load_library
from serve.models.attention import DecodeGroup, TorchAttention
from serve.models.config import AttentionWindow

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
_SIGNATURES = {"paged_decode_attention": (
    [PTR, PTR, PTR, LONG, LONG, LONG, LONG, LONG, LONG, PTR, LONG, PTR, PTR, PTR, FLOAT, PTR, INT], None)}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return load_library(_SOURCE, _SIGNATURES)


def paged_decode_available(cache: torch.Tensor) -> bool:
    return cache.device.type == "cpu" and cache.dtype == torch.float32 and _library() is not None


def paged_decode_attention(q_BHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           tables_BM: torch.Tensor, lens_B: torch.Tensor, starts_B: torch.Tensor | None = None,
                           sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(Dh)) v`` per sequence over its cached keys ``starts_B[b] .. lens_B[b] - 1``
    (``starts_B`` None: from 0); ``sinks_H``: per-head logits added to each softmax's denominator (None: none).

    ``q_BHd`` fp32; ``k_cache``/``v_cache`` one layer, ``[Hkv, NB, BS, Dh]`` contiguous; ``tables_BM`` int64
    block ids (padding never read); ``lens_B`` int64, each >= 1; ``starts_B`` int64 in ``[0, lens_B)``.
    Returns ``[B, H, Dh]``.
    """
    B, H, Dh = q_BHd.shape
    Hkv, NB, BS, _ = k_cache.shape
    q = q_BHd.float().contiguous()
    tables, lens = tables_BM.contiguous(), lens_B.contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and tables.dtype == lens.dtype == torch.int64):
        raise ValueError("paged_decode_attention: caches must be contiguous and tables/lens int64")
    starts = None if starts_B is None else starts_B.contiguous()
    sinks = None if sinks_H is None else sinks_H.float().contiguous()
    if starts is not None and starts.dtype != torch.int64:
        raise ValueError("paged_decode_attention: starts_B must be int64")
    out = torch.empty_like(q)
    _library().paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), B, H, Hkv, Dh, NB, BS, tables.data_ptr(),
        tables.shape[1], lens.data_ptr(), None if starts is None else starts.data_ptr(),
        None if sinks is None else sinks.data_ptr(), Dh**-0.5, out.data_ptr(), torch.get_num_threads())
    return out


class CpuAttention(TorchAttention):
    """Decodes by the C kernel, all of a step's in one call (it reads each sequence's own keys); prefill chunks
    by SDPA (:class:`TorchAttention`). MLA steps are the torch backend's (``mla_step``): with one kv "head" for
    all 128 of DeepSeek-V3's query heads, two batched matmuls over the gathered latents beat this kernel's
    per-head dot products (7.7 vs 16.5 ms for one 1024-token decode, 87 vs 120 ms for eight, 2 threads)."""

    name = "cpu"
    one_decode_group = True

    def decode_bounds(self, group: DecodeGroup, window: AttentionWindow) -> torch.Tensor | None:
        """Each sequence's first key (None: from 0)."""
        return None if window.full else window.first_key(group.lens_B - 1)

    def decode(self, q_BHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
               starts_B: torch.Tensor | None, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
        return paged_decode_attention(q_BHd, k_cache, v_cache, group.tables_BM, group.lens_B, starts_B,
                                      sinks_H).to(q_BHd.dtype)
