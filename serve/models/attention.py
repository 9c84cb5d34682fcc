"""The paged KV cache, the step's attention metadata, and the attention backends that read it.

Shape legend: T tokens of the step, H query heads, Hkv key/value heads, Dh head dim, B decoding sequences,
NB blocks in the pool, BS block size, M blocks per sequence (padded), S = M * BS key slots.

A step's tokens are laid out decodes first (one token each, in groups of similar length so that padding to the
longest wastes little), then each prefill chunk contiguously. Token ``t`` of a sequence at position ``p`` writes
its K/V to slot ``block_table[p // BS] * BS + p % BS`` before attending.

One interface, :class:`AttentionBackend`: ``metadata(...)`` describes a step on the host (``ModelRunner.prepare``
moves it to the device with the token ids), ``step(cache, metadata)`` returns the :class:`StepAttention` that
every layer calls. The backends (``select_attention_backend`` in :mod:`serve.models.attention_backends`):

- :class:`TorchAttention`: plain torch on any device (gather the blocks, SDPA); the reference.
- ``CpuAttention`` (:mod:`serve.models.cpu_attention`): the C decode kernel reading the cache in place, SDPA for
  prefill; fp32 CPU caches.
- ``TritonAttention`` (:mod:`serve.models.triton_attention`): one Triton kernel for the whole step, decodes and
  prefill chunks over cached prefixes, reading K/V in place through the block tables; CUDA (or the interpreter).

Multi-head latent attention (:mod:`serve.models.mla`) caches one latent per token (:class:`LatentKVCache`, the
same blocks and slots) and goes through ``backend.mla_step(cache, metadata)`` instead, whose ``attend_latent``
every MLA layer calls; :func:`kv_cache_class` says which cache a model needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch

from serve.models.config import FULL_ATTENTION, AttentionWindow, DecoderConfig
from serve.models.latent_cache import LatentKVCache
from serve.models.layers import StepAttention
from serve.models.masked_sdpa import sdpa, window_mask
from serve.models.mla import MLAStepAttention
from serve.models.mla_attention import TorchMLAStep
from serve.models.paged_pool import PagedPool


class PagedKVCache(PagedPool):
    """K and V for every layer: ``k[layer]``, ``v[layer]`` are ``[Hkv, NB + 1, BS, Dh]`` views of one pool
    ``[2, layers, Hkv, NB + 1, BS, Dh]`` (blocks, slots and the null block: :class:`PagedPool`).

    Head-major: gathering a batch's blocks (``index_select`` on the block dim) gives ``[Hkv, B, S, Dh]``, the
    contiguous operand of a batched matmul, with no transpose copy (~3x faster decode attention on CPU).
    """

    block_dim = 3

    def __init__(self, config: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(config, num_blocks, block_size, dtype, device)
        self.k, self.v = self.pool[0], self.pool[1]

    @staticmethod
    def pool_shape(config: DecoderConfig, blocks: int, block_size: int) -> tuple[int, ...]:
        return 2, config.num_layers, config.num_kv_heads, blocks, block_size, config.head_dim

    def write(self, layer: int, slot_mapping_T: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor) -> None:
        """Store the step's K/V of ``layer`` in their slots (torch ``index_copy_``, any device)."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        Hkv, Dh = k_THd.shape[1:]
        k_cache.view(Hkv, -1, Dh).index_copy_(1, slot_mapping_T, k_THd.transpose(0, 1).to(k_cache.dtype))
        v_cache.view(Hkv, -1, Dh).index_copy_(1, slot_mapping_T, v_THd.transpose(0, 1).to(v_cache.dtype))


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the step's layout
    num_tokens: int
    num_cached: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # [blocks covering num_cached + num_tokens] int64

    def to(self, device: torch.device) -> PrefillChunk:
        return replace(self, block_table=self.block_table.to(device, non_blocking=True))


@dataclass
class DecodeGroup:
    """Consecutive one-token sequences of the step, attended in one batch (padded to the longest of them on the
    torch path; the C and Triton kernels read each sequence's own keys)."""

    start: int
    tables_BM: torch.Tensor  # int64, padded with block 0
    lens_B: torch.Tensor  # int64 keys per sequence
    block_size: int

    def to(self, device: torch.device) -> DecodeGroup:
        return DecodeGroup(self.start, self.tables_BM.to(device, non_blocking=True),
                           self.lens_B.to(device, non_blocking=True), self.block_size)

    @classmethod
    def build(cls, start: int, tables: list[list[int]], lens: list[int], block_size: int,
              width: int | None = None) -> DecodeGroup:
        """``width``: blocks per row of ``tables_BM`` (default: what the longest sequence needs)."""
        width = -(-max(lens) // block_size) if width is None else width
        # host tensors: ModelRunner.prepare builds the step on the host, forward moves it
        tables_BM = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], dtype=torch.int64)
        return cls(start, tables_BM, torch.tensor(lens, dtype=torch.int64), block_size)  # host, as above

    def mask_B11S(self, window: AttentionWindow = FULL_ATTENTION) -> torch.Tensor:
        """Additive float mask: 0 where slot s holds one of the keys the sequence's query sees (its window's),
        else -inf (the torch path)."""
        slots_S = torch.arange(self.tables_BM.shape[1] * self.block_size, device=self.lens_B.device)
        mask_BS = slots_S[None, :] >= self.lens_B[:, None]
        if not window.full:
            mask_BS |= slots_S[None, :] < window.first_key(self.lens_B - 1)[:, None]
        return torch.zeros(mask_BS.shape, device=mask_BS.device).masked_fill_(mask_BS, float("-inf"))[:, None, None]


@dataclass
class AttentionMetadata:
    """What a step's attention needs besides q/k/v, built on the host by ``ModelRunner.prepare``. A backend
    that wants more (the Triton one: its query tiles) subclasses it; every tensor field moves with ``to``."""

    slot_mapping_T: torch.Tensor
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]

    def to(self, device: torch.device) -> AttentionMetadata:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device, non_blocking=True)
            elif isinstance(value, list):
                moved[f.name] = [item.to(device) for item in value]
        return replace(self, **moved)


class AttentionBackend:
    """One way of attending through the paged cache. ``one_decode_group``: the backend reads each sequence's
    own keys, so every decode of a step goes in one group (the torch path pads a group to its longest).
    ``sparse_mla``: its MLA step takes DeepSeek Sparse Attention's indexer outputs."""

    name: ClassVar[str]
    one_decode_group: ClassVar[bool] = False
    sparse_mla: ClassVar[bool] = False  # its MLA step serves DeepSeek Sparse Attention (an ``index`` argument)

    def metadata(self, slot_mapping_T: torch.Tensor, decodes: list[DecodeGroup],
                 prefills: list[PrefillChunk]) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping_T, decodes, prefills)

    def step(self, cache: PagedKVCache, metadata: AttentionMetadata) -> StepAttention:
        raise NotImplementedError

    def mla_step(self, cache: LatentKVCache, metadata: AttentionMetadata) -> MLAStepAttention:
        """The step of an MLA model (the latent cache): ``attend_latent`` instead of ``attend``."""
        raise NotImplementedError(f"attention backend {self.name!r} has no MLA step")


def kv_cache_class(config: DecoderConfig) -> type[PagedKVCache] | type[LatentKVCache]:
    """The cache a model needs: one latent per token for MLA, K and V per kv head otherwise (the constructor and
    ``bytes_per_block(config, block_size, dtype)`` are the same)."""
    return LatentKVCache if config.mla is not None else PagedKVCache


class TorchAttention(AttentionBackend):
    """Plain torch on any device: the reference backend (gathered blocks + SDPA). ``decode`` takes what
    ``decode_bounds`` built once per step for a decode group and window: the padding mask here, each sequence's
    first key for the C kernel (which reads lengths)."""

    name = "torch"
    sparse_mla = True
    mla_absorb_decodes = True  # False: MLA decodes expand K/V from the latents (benchmarks/mla_decode.py)

    def step(self, cache: PagedKVCache, metadata: AttentionMetadata) -> StepAttention:
        return _TorchStep(self, cache, metadata)

    def mla_step(self, cache: LatentKVCache, metadata: AttentionMetadata) -> MLAStepAttention:
        return TorchMLAStep(cache, metadata, self.mla_absorb_decodes)

    def decode_bounds(self, group: DecodeGroup, window: AttentionWindow) -> torch.Tensor:
        """What ``decode`` needs to know which keys each query sees: the group's padding (and window) mask."""
        return group.mask_B11S(window)

    def decode(self, q_BHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
               mask_B11S: torch.Tensor, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
        B, H, Dh = q_BHd.shape
        Hkv = k_cache.shape[0]
        blocks = group.tables_BM.view(-1)
        # [Hkv, B*M, BS, Dh] -> [B, Hkv, S, Dh] as a strided view: SDPA reads it without a copy
        k_BHkvSd = k_cache.index_select(1, blocks).view(Hkv, B, -1, Dh).transpose(0, 1)
        v_BHkvSd = v_cache.index_select(1, blocks).view(Hkv, B, -1, Dh).transpose(0, 1)
        dtype = q_BHd.dtype
        o_BH1d = sdpa(q_BHd[:, :, None], k_BHkvSd.to(dtype), v_BHkvSd.to(dtype), mask_B11S.to(dtype), sinks_H)
        return o_BH1d.view(B, H, Dh)

    @staticmethod
    def prefill(q_THd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PrefillChunk,
                window: AttentionWindow = FULL_ATTENTION, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
        Hkv, Dh = k_cache.shape[0], k_cache.shape[-1]
        total = chunk.num_cached + chunk.num_tokens
        k_HkvSd = k_cache.index_select(1, chunk.block_table).view(Hkv, -1, Dh)[:, :total]
        v_HkvSd = v_cache.index_select(1, chunk.block_table).view(Hkv, -1, Dh)[:, :total]
        # query i (at position num_cached + i) sees keys first_key(num_cached + i) .. num_cached + i
        return attend_one(q_THd.transpose(0, 1), k_HkvSd, v_HkvSd,
                          window_mask(chunk.num_cached, chunk.num_tokens, window, q_THd.device), sinks_H)


class _TorchStep:
    """``StepAttention`` of the torch-based backends: writes the step's K/V, then attends group by group."""

    def __init__(self, backend: TorchAttention, cache: PagedKVCache, metadata: AttentionMetadata) -> None:
        self.backend, self.cache, self.metadata = backend, cache, metadata
        # per (decode group, window): its mask (torch) or first keys (C kernel), built in the first layer that
        # needs it, not per layer (SDPA would convert a boolean mask in every layer)
        self.bounds: dict[tuple[int, AttentionWindow], torch.Tensor | None] = {}

    def _decode(self, i: int, q_BHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                window: AttentionWindow, sinks_H: torch.Tensor | None) -> torch.Tensor:
        group = self.metadata.decodes[i]
        if (i, window) not in self.bounds:
            self.bounds[i, window] = self.backend.decode_bounds(group, window)
        return self.backend.decode(q_BHd, k_cache, v_cache, group, self.bounds[i, window], sinks_H)

    def attend(self, layer: int, q_THd: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor,
               window: AttentionWindow = FULL_ATTENTION, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
        meta, backend = self.metadata, self.backend
        self.cache.write(layer, meta.slot_mapping_T, k_THd, v_THd)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        if len(meta.decodes) == 1 and not meta.prefills:
            return self._decode(0, q_THd, k_cache, v_cache, window, sinks_H)
        o_THd = torch.empty_like(q_THd)
        for i, group in enumerate(meta.decodes):
            rows = slice(group.start, group.start + group.tables_BM.shape[0])
            o_THd[rows] = self._decode(i, q_THd[rows], k_cache, v_cache, window, sinks_H)
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            if chunk.num_cached == 0:  # nothing to read back: attend over the chunk's own K/V
                mask_TS = None if window.full else window_mask(0, chunk.num_tokens, window, q_THd.device)
                o_THd[rows] = attend_one(q_THd[rows].transpose(0, 1), k_THd[rows].transpose(0, 1),
                                         v_THd[rows].transpose(0, 1), mask_TS, sinks_H)
            else:
                o_THd[rows] = backend.prefill(q_THd[rows], k_cache, v_cache, chunk, window, sinks_H)
        return o_THd


def attend_one(q_HTd: torch.Tensor, k_HkvSd: torch.Tensor, v_HkvSd: torch.Tensor,
               mask_TS: torch.Tensor | None, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence: SDPA with GQA; causal when ``mask_TS`` is None. Returns ``[T, H, Dh]``."""
    dtype = q_HTd.dtype
    o = sdpa(q_HTd[None], k_HkvSd[None].to(dtype), v_HkvSd[None].to(dtype), mask_TS, sinks_H)
    return o[0].transpose(0, 1)
