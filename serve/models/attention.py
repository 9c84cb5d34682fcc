"""Attention over the paged KV cache, in plain torch (CPU or any device).

Shape legend: T tokens of the step, H query heads, Hkv key/value heads, Dh head dim, B decoding sequences,
NB blocks in the pool, BS block size, M blocks per sequence (padded), S = M * BS key slots.

A step's tokens are laid out decodes first (one token each, in groups of similar length so that padding to the
longest wastes little), then each prefill chunk contiguously. Token ``t``
of a sequence at position ``p`` writes its K/V to slot ``block_table[p // BS] * BS + p % BS`` before attending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from serve.models.config import DecoderConfig
from serve.models.cpu_attention import paged_decode_attention, paged_decode_available


class PagedKVCache:
    """K and V for every layer: ``k[layer]``, ``v[layer]`` are ``[Hkv, NB, BS, Dh]`` views of one pool.

    Head-major: gathering a batch's blocks (``index_select`` on the block dim) gives ``[Hkv, B, S, Dh]``, the
    contiguous operand of a batched matmul, with no transpose copy (~3x faster decode attention on CPU).
    """

    def __init__(self, config: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        shape = (2, config.num_layers, config.num_kv_heads, num_blocks, block_size, config.head_dim)
        self.pool = torch.zeros(shape, dtype=dtype)
        self.k, self.v = self.pool[0], self.pool[1]
        self.block_size = block_size
        self.c_decode = paged_decode_available(self.pool)  # decode attention by the C kernel, read in place

    @staticmethod
    def bytes_per_block(config: DecoderConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = torch.tensor([s for s, _ in copies])
            dst = torch.tensor([d for _, d in copies])
            self.pool[:, :, :, dst] = self.pool[:, :, :, src]


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the step's layout
    num_tokens: int
    num_cached: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # [blocks covering num_cached + num_tokens] int64


@dataclass
class DecodeGroup:
    """Consecutive one-token sequences of the step, attended in one batch (padded to the longest of them on the
    torch path; the C kernel reads each sequence's own keys)."""

    start: int
    tables_BM: torch.Tensor  # int64, padded with block 0
    lens_B: torch.Tensor  # int64 keys per sequence
    block_size: int
    _mask: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(cls, start: int, tables: list[list[int]], lens: list[int], block_size: int) -> DecodeGroup:
        width = -(-max(lens) // block_size)
        tables_BM = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables])
        return cls(start, tables_BM, torch.tensor(lens), block_size)

    @property
    def mask_B11S(self) -> torch.Tensor:
        """Additive float mask: 0 where slot s holds one of the sequence's keys, else -inf. Built on first use
        (the torch path; once per step, not per layer: SDPA would convert a boolean mask in every layer)."""
        if self._mask is None:
            slots = self.tables_BM.shape[1] * self.block_size
            mask_BS = torch.arange(slots)[None, :] >= self.lens_B[:, None]
            self._mask = torch.zeros(mask_BS.shape).masked_fill_(mask_BS, float("-inf"))[:, None, None]
        return self._mask


class PagedAttention:
    """``AttentionBackend`` for one step: writes the step's K/V into the cache, then attends through it."""

    def __init__(self, cache: PagedKVCache, slot_mapping_T: torch.Tensor, decodes: list[DecodeGroup],
                 prefills: list[PrefillChunk]) -> None:
        self.cache = cache
        self.slot_mapping_T = slot_mapping_T
        self.decodes = decodes
        self.prefills = prefills

    def attend(self, layer: int, q_THd: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        Hkv, Dh = k_THd.shape[1:]
        k_cache.view(Hkv, -1, Dh).index_copy_(1, self.slot_mapping_T, k_THd.transpose(0, 1).to(k_cache.dtype))
        v_cache.view(Hkv, -1, Dh).index_copy_(1, self.slot_mapping_T, v_THd.transpose(0, 1).to(v_cache.dtype))
        if len(self.decodes) == 1 and not self.prefills:
            return self._decode(q_THd, k_cache, v_cache, self.decodes[0])
        o_THd = torch.empty_like(q_THd)
        for group in self.decodes:
            rows = slice(group.start, group.start + group.tables_BM.shape[0])
            o_THd[rows] = self._decode(q_THd[rows], k_cache, v_cache, group)
        for chunk in self.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            if chunk.num_cached == 0:  # nothing to read back: attend over the chunk's own K/V
                o_THd[rows] = _attend(q_THd[rows].transpose(0, 1), k_THd[rows].transpose(0, 1),
                                      v_THd[rows].transpose(0, 1), None)
            else:
                o_THd[rows] = self._prefill(q_THd[rows], k_cache, v_cache, chunk)
        return o_THd

    def _decode(self, q_BHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                group: DecodeGroup) -> torch.Tensor:
        if self.cache.c_decode:
            return paged_decode_attention(q_BHd, k_cache, v_cache, group.tables_BM, group.lens_B).to(q_BHd.dtype)
        B, H, Dh = q_BHd.shape
        Hkv = k_cache.shape[0]
        blocks = group.tables_BM.view(-1)
        # [Hkv, B*M, BS, Dh] -> [B, Hkv, S, Dh] as a strided view: SDPA reads it without a copy
        k_BHkvSd = k_cache.index_select(1, blocks).view(Hkv, B, -1, Dh).transpose(0, 1)
        v_BHkvSd = v_cache.index_select(1, blocks).view(Hkv, B, -1, Dh).transpose(0, 1)
        dtype = q_BHd.dtype
        o_BH1d = F.scaled_dot_product_attention(q_BHd[:, :, None], k_BHkvSd.to(dtype), v_BHkvSd.to(dtype),
                                                attn_mask=group.mask_B11S.to(dtype), enable_gqa=True)
        return o_BH1d.view(B, H, Dh)

    @staticmethod
    def _prefill(q_THd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 chunk: PrefillChunk) -> torch.Tensor:
        Hkv, Dh = k_cache.shape[0], k_cache.shape[-1]
        total = chunk.num_cached + chunk.num_tokens
        k_HkvSd = k_cache.index_select(1, chunk.block_table).view(Hkv, -1, Dh)[:, :total]
        v_HkvSd = v_cache.index_select(1, chunk.block_table).view(Hkv, -1, Dh)[:, :total]
        # query i (at position num_cached + i) sees keys 0 .. num_cached + i
        mask_TS = torch.arange(total)[None, :] <= (chunk.num_cached + torch.arange(chunk.num_tokens))[:, None]
        return _attend(q_THd.transpose(0, 1), k_HkvSd, v_HkvSd, mask_TS)


def _attend(q_HTd: torch.Tensor, k_HkvSd: torch.Tensor, v_HkvSd: torch.Tensor,
            mask_TS: torch.Tensor | None) -> torch.Tensor:
    """One sequence: SDPA with GQA; causal when ``mask_TS`` is None. Returns ``[T, H, Dh]``."""
    dtype = q_HTd.dtype
    o = F.scaled_dot_product_attention(q_HTd[None], k_HkvSd[None].to(dtype), v_HkvSd[None].to(dtype),
                                       attn_mask=mask_TS, is_causal=mask_TS is None, enable_gqa=True)
    return o[0].transpose(0, 1)
