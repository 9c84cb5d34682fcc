"""Paged attention for a whole step in one Triton launch: decodes and prefill chunks, over cached prefixes.

Shape legend (as :mod:`serve.models.attention`): T tokens of the step, H query heads, Hkv key/value heads,
G = H // Hkv query heads per kv head, Dh head dim, BS block size, N query tiles, R sequences of the step, M blocks
per table row (padded).

**Tiles.** ``TritonAttention.metadata`` cuts the step into query tiles on the host: each is up to ``block_q``
consecutive query tokens of one sequence (a decode is a tile of one token), described by a row of ``tiles_N4``
``(first row in the step, query tokens, position of the first query, row of tables_RM)``. The kernel's grid is
``(N, Hkv)``: a program loads its tile's tokens times the G query heads of its kv head as one ``[BLOCK_M, Dh]``
query block (row ``m`` is token ``m // G``, head ``m % G``; BLOCK_M = next_pow2(block_q * G), at least 16), so
each key and value is read once per tile for the whole group, then walks the keys ``first .. pos + tokens - 1``
(``first``: 0, or the tile's first query's window start) in ``BLOCK_N`` chunks with an online softmax. Each key
looks up its own block (``tables_RM[seq, key // BS]``), so BS need not divide or equal BLOCK_N; a query at
position ``p`` masks keys past ``p`` and before its window's first key. Example, ``block_q=4``: two decodes
with 5 and 1 keys, then a chunk of 6 tokens with 3 cached, at rows 2..7::

    tiles_N4 = [[0, 1, 4, 0], [1, 1, 0, 1], [2, 4, 3, 2], [6, 2, 7, 2]]

**CUDA graphs.** Everything a step changes (tiles, tables, slots) is read from device tensors; the launch
arguments depend only on shapes (N, M, H, Hkv, Dh, BS) and ``block_q`` (1 for decode-only steps).

**MLA** (:meth:`TritonAttention.mla_step`): the same kernel attends in the latent space, absorbed for decodes
and prefill chunks alike: the queries ``q_lat = [q_nope W_UK, q_pe]`` (C wide) over one "kv head" whose keys
and values are both the cached latent rows (``[1, NB + 1, BS, C]``, a view of the layer's latent cache), of
whose output the first L values are kept and projected by ``W_UV``. It reads each latent row twice (as K and
as V) and computes R / C more of the value sum than it needs; a dedicated kernel (one load, a head-split grid
for DeepSeek's 128 heads, whose G = H rows make BLOCK_M large) is left for a GPU to tune against.

From vLLM's unified Triton attention (``triton_unified_attention.py``) we took the ``(query tile, kv head)`` grid
with the G heads of a kv head folded into the rows of one dot, the per-key block lookup that decouples the key
tile from BS, and one kernel for decodes and chunked prefill alike; vLLM finds each program's sequence by a
binary search over ``query_start_loc`` in the kernel, we list the tiles on the host instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve.models.attention import AttentionBackend, AttentionMetadata, DecodeGroup, PagedKVCache, PrefillChunk
from serve.models.config import FULL_ATTENTION, AttentionWindow
from serve.models.latent_cache import LatentKVCache
from serve.models.mla import MLAWeights, absorb_queries, unabsorb_output
from serve.models.sparse_attention import IndexerQuery

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports: ``triton_attention_available`` says False
    triton = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_N = 32  # keys per iteration


def triton_attention_available(probe: torch.Tensor) -> bool:
    """Triton importable, ``probe`` on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) and fp32/fp16/bf16."""
    if triton is None or probe.dtype not in _DTYPES:
        return False
    if probe.device.type == "cpu":  # the kernels must have been decorated by the interpreter
        return os.environ.get("TRITON_INTERPRET") == "1" and not isinstance(_attention_kernel, triton.JITFunction)
    return probe.device.type == "cuda"


@dataclass
class TritonMetadata(AttentionMetadata):
    """The step's query tiles (see the module docstring): ``tiles_N4`` int32 rows ``(row, tokens, pos, seq)``,
    ``tables_RM`` int32 block tables (decodes' rows, then one per prefill chunk), ``block_q`` tokens per tile."""

    tiles_N4: torch.Tensor
    tables_RM: torch.Tensor
    block_q: int


class TritonAttention(AttentionBackend):
    """One Triton launch per layer for the whole step (after a small one storing its K/V). ``block_q``: query
    tokens per prefill tile (decode-only steps use 1)."""

    name = "triton"
    one_decode_group = True

    def __init__(self, block_q: int = 16) -> None:
        if block_q < 1:
            raise ValueError(f"block_q ({block_q}) must be >= 1")
        self.block_q = block_q

    def metadata(self, slot_mapping_T: torch.Tensor, decodes: list[DecodeGroup],
                 prefills: list[PrefillChunk]) -> TritonMetadata:
        """On the host: a tile per decode, ``ceil(num_tokens / block_q)`` per chunk; a table row per sequence."""
        block_q = self.block_q if prefills else 1
        tiles = [torch.zeros(0, 4, dtype=torch.int32)]
        tables = [torch.zeros(0, 1, dtype=torch.int64)]
        seq = 0
        for group in decodes:
            b_B = torch.arange(group.lens_B.shape[0], dtype=torch.int32)
            tiles.append(torch.stack([group.start + b_B, torch.ones_like(b_B), group.lens_B.int() - 1, seq + b_B], 1))
            tables.append(group.tables_BM)
            seq += len(b_B)
        for chunk in prefills:  # host tensors, as all of the metadata: ``ModelRunner`` moves the step's inputs
            tiles.append(torch.tensor([[chunk.start + i, min(block_q, chunk.num_tokens - i), chunk.num_cached + i, seq]
                                       for i in range(0, chunk.num_tokens, block_q)], dtype=torch.int32).view(-1, 4))
            tables.append(chunk.block_table[None])
            seq += 1
        width = max(t.shape[1] for t in tables)
        tables_RM = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tables]).int()
        return TritonMetadata(slot_mapping_T, decodes, prefills, torch.cat(tiles), tables_RM, block_q)

    def step(self, cache: PagedKVCache, metadata: AttentionMetadata) -> _TritonStep:
        if not isinstance(metadata, TritonMetadata):
            raise TypeError(f"TritonAttention.step needs the TritonMetadata of its metadata(), got {type(metadata)}")
        return _TritonStep(cache, metadata)

    def mla_step(self, cache: LatentKVCache, metadata: AttentionMetadata) -> _TritonMLAStep:
        if not isinstance(metadata, TritonMetadata) or not isinstance(cache, LatentKVCache):
            raise TypeError(f"TritonAttention.mla_step needs a LatentKVCache and TritonMetadata, got "
                            f"{type(cache).__name__}, {type(metadata).__name__}")
        return _TritonMLAStep(cache, metadata)


class _TritonMLAStep:
    """The whole step absorbed, one ``paged_attention`` launch per layer over the latent cache (module docstring)."""

    def __init__(self, cache: LatentKVCache, metadata: TritonMetadata) -> None:
        self.cache, self.metadata = cache, metadata

    def attend_latent(self, layer: int, q_nope_THN: torch.Tensor, q_pe_THR: torch.Tensor, latent_TC: torch.Tensor,
                      weights: MLAWeights, index: IndexerQuery | None = None) -> torch.Tensor:
        if index is not None:  # select_attention_backend never picks this backend for a DSA model
            raise NotImplementedError("the Triton MLA step has no DeepSeek Sparse Attention")
        meta = self.metadata
        self.cache.write(layer, meta.slot_mapping_T, latent_TC)
        latent_1NBC = self.cache.latent[layer][None]
        q_lat_THC = absorb_queries(q_nope_THN, q_pe_THR, weights)
        o_THC = paged_attention(q_lat_THC, latent_1NBC, latent_1NBC, meta.tiles_N4, meta.tables_RM, meta.block_q,
                                scale=weights.scale)
        return unabsorb_output(o_THC[..., :weights.kv_b_weight.shape[-1]], weights)


class _TritonStep:
    def __init__(self, cache: PagedKVCache, metadata: TritonMetadata) -> None:
        self.cache, self.metadata = cache, metadata

    def attend(self, layer: int, q_THd: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor,
               window: AttentionWindow = FULL_ATTENTION, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
        meta = self.metadata
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        store_kv(k_THd, v_THd, k_cache, v_cache, meta.slot_mapping_T)
        return paged_attention(q_THd, k_cache, v_cache, meta.tiles_N4, meta.tables_RM, meta.block_q,
                               window=window, sinks_H=sinks_H)


def store_kv(k_THd: torch.Tensor, v_THd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping_T: torch.Tensor) -> None:
    """``k_cache.view(Hkv, -1, Dh)[:, slot_mapping_T[t]] = k_THd[t]`` (and v) for every row whose slot is >= 0.

    ``k_THd``/``v_THd`` ``[T, Hkv, Dh]``, any strides, cast to the cache's dtype; caches ``[Hkv, NB + 1, BS, Dh]``
    contiguous.
    """
    T, Hkv, Dh = k_THd.shape
    if k_cache.shape[0] != Hkv or k_cache.shape[-1] != Dh or v_THd.shape != k_THd.shape:
        raise ValueError(f"store_kv: k {tuple(k_THd.shape)}, v {tuple(v_THd.shape)} do not fit the cache "
                         f"{tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or slot_mapping_T.shape != (T,):
        raise ValueError(f"store_kv: caches must be contiguous and slot_mapping_T [{T}], got "
                         f"{tuple(slot_mapping_T.shape)}")
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_THd, v_THd))
    if T:
        _store_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping_T, k.stride(0), k.stride(1), v.stride(0),
                               v.stride(1), k_cache.stride(0), Hkv, Dh, triton.next_power_of_2(Hkv),
                               triton.next_power_of_2(Dh))


def paged_attention(q_THd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tiles_N4: torch.Tensor,
                    tables_RM: torch.Tensor, block_q: int, scale: float | None = None,
                    window: AttentionWindow = FULL_ATTENTION, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the step's queries over their sequences' cached keys, tile by tile (module docstring);
    scores times ``scale`` (default ``Dh ** -0.5``). ``window``: a query at ``p`` sees keys ``window.first_key(p)
    .. p`` (the walk starts at the tile's first query's first key); ``sinks_H``: per-head logits in each softmax's
    denominator (gpt-oss), which start the online softmax as a key with no value.

    ``q_THd`` fp32/fp16/bf16; caches ``[Hkv, NB + 1, BS, Dh]`` contiguous (K/V already stored); ``tiles_N4``
    int32 ``(row, tokens <= block_q, pos, seq)``; ``tables_RM`` int32/int64. Returns ``[T, H, Dh]`` in q's dtype
    (rows no tile covers are left unwritten).
    """
    T, H, Dh = q_THd.shape
    Hkv, _, BS, _ = k_cache.shape
    if H % Hkv or k_cache.shape[-1] != Dh or v_cache.shape != k_cache.shape or q_THd.dtype not in _DTYPES:
        raise ValueError(f"paged_attention: q {tuple(q_THd.shape)} {q_THd.dtype} does not fit the cache "
                         f"{tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and tiles_N4.is_contiguous()
            and tables_RM.is_contiguous()) or tiles_N4.dtype != torch.int32 or tiles_N4.shape[1:] != (4,):
        raise ValueError("paged_attention: caches, tiles_N4 (int32 [N, 4]) and tables_RM must be contiguous")
    q = q_THd if q_THd.stride(-1) == 1 else q_THd.contiguous()
    o_THd = torch.empty((T, H, Dh), dtype=q.dtype, device=q.device)
    G = H // Hkv
    BLOCK_M, BLOCK_D = max(16, triton.next_power_of_2(block_q * G)), max(16, triton.next_power_of_2(Dh))
    scale_log2 = (Dh**-0.5 if scale is None else scale) * 1.4426950408889634  # the kernel exponentiates base 2
    sinks = q if sinks_H is None else sinks_H.float().contiguous()  # (an unread pointer without sinks)
    if tiles_N4.shape[0]:
        _attention_kernel[(tiles_N4.shape[0], Hkv)](
            q, k_cache, v_cache, o_THd, tiles_N4, tables_RM, sinks, q.stride(0), q.stride(1), o_THd.stride(0),
            o_THd.stride(1), tables_RM.stride(0), k_cache.stride(0), scale_log2, window.sliding, window.chunk,
            sinks_H is not None, G, Dh, BS, BLOCK_M, BLOCK_D, BLOCK_N, "ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=4 if BLOCK_M * BLOCK_D <= 64 * 128 else 8)
    return o_THd


if triton is not None:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_kt, stride_kh, stride_vt,
                         stride_vh, stride_cache_h, Hkv: tl.constexpr, Dh: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        if slot >= 0:  # a negative slot: the row stores nothing
            h = tl.arange(0, BLOCK_H)[:, None]
            d = tl.arange(0, BLOCK_D)[None, :]
            mask = (h < Hkv) & (d < Dh)
            dst = h.to(tl.int64) * stride_cache_h + slot * Dh + d
            k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
            tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
            v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
            tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, o_ptr, tiles_ptr, tables_ptr, sinks_ptr, stride_qt,
                          stride_qh, stride_ot, stride_oh, stride_table, stride_cache_h, scale_log2,
                          SLIDING: tl.constexpr, CHUNK: tl.constexpr, HAS_SINKS: tl.constexpr, G: tl.constexpr,
                          Dh: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
        tile, kv_head = tl.program_id(0), tl.program_id(1)
        # 1. the tile: rows row0 .. row0 + num_q of the step, at positions pos0 .., reading table row seq
        row0 = tl.load(tiles_ptr + tile * 4)
        num_q = tl.load(tiles_ptr + tile * 4 + 1)
        pos0 = tl.load(tiles_ptr + tile * 4 + 2)
        seq = tl.load(tiles_ptr + tile * 4 + 3).to(tl.int64)
        m = tl.arange(0, BLOCK_M)
        token_M, head_M = m // G, kv_head * G + m % G
        d = tl.arange(0, BLOCK_D)
        row_mask = (token_M < num_q)[:, None] & (d < Dh)[None, :]
        q_MD = tl.load(q_ptr + (row0 + token_M)[:, None] * stride_qt + head_M[:, None] * stride_qh + d[None, :],
                       mask=row_mask, other=0.0)
        # padding rows take the tile's first position: they see its first query's keys, so no row is all -inf
        pos_M = pos0 + tl.where(token_M < num_q, token_M, 0)
        if SLIDING:  # each row's first key (the window is one contiguous range ending at the row's position)
            first_M = tl.maximum(pos_M - SLIDING + 1, 0)
        elif CHUNK:
            first_M = pos_M // CHUNK * CHUNK
        else:
            first_M = pos_M * 0
        # 2. online softmax over keys first_M[0] .. pos0 + num_q - 1 (the bounds are read here, not passed by the
        # host); a sink is a first key with no value: max = sink, sum = 1
        if HAS_SINKS:
            max_M = tl.load(sinks_ptr + head_M).to(tl.float32) * 1.4426950408889634
            sum_M = tl.full([BLOCK_M], 1.0, tl.float32)
        else:
            max_M = tl.full([BLOCK_M], float("-inf"), tl.float32)
            sum_M = tl.zeros([BLOCK_M], tl.float32)
        acc_MD = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        num_keys = pos0 + num_q
        cache_h = kv_head.to(tl.int64) * stride_cache_h
        for start in range(tl.min(first_M, 0), num_keys, BLOCK_N):
            key_N = start + tl.arange(0, BLOCK_N)
            block_N = tl.load(tables_ptr + seq * stride_table + key_N // BS, mask=key_N < num_keys, other=0)
            slot_N = block_N.to(tl.int64) * BS + key_N % BS
            kv_mask = (key_N < num_keys)[:, None] & (d < Dh)[None, :]  # never load past the tile's last key
            offs_ND = cache_h + slot_N[:, None] * Dh + d[None, :]
            k_ND = tl.load(k_cache_ptr + offs_ND, mask=kv_mask, other=0.0).to(q_MD.dtype)
            v_ND = tl.load(v_cache_ptr + offs_ND, mask=kv_mask, other=0.0).to(q_MD.dtype)
            s_MN = tl.dot(q_MD, tl.trans(k_ND), input_precision=DOT_PRECISION) * scale_log2
            seen_MN = (key_N[None, :] <= pos_M[:, None]) & (key_N[None, :] >= first_M[:, None])
            s_MN = tl.where(seen_MN, s_MN, float("-inf"))
            new_max_M = tl.maximum(max_M, tl.max(s_MN, 1))
            # a row none of whose keys came yet (its window starts later) keeps max -inf: exponentiate against 0
            safe_max_M = tl.where(new_max_M == float("-inf"), 0.0, new_max_M)
            p_MN = tl.exp2(s_MN - safe_max_M[:, None])
            alpha_M = tl.exp2(max_M - safe_max_M)
            sum_M = sum_M * alpha_M + tl.sum(p_MN, 1)
            acc_MD = acc_MD * alpha_M[:, None] + tl.dot(p_MN.to(v_ND.dtype), v_ND, input_precision=DOT_PRECISION)
            max_M = new_max_M
        # 3. normalise and store the tile's rows
        o_MD = acc_MD / sum_M[:, None]
        tl.store(o_ptr + (row0 + token_M)[:, None] * stride_ot + head_M[:, None] * stride_oh + d[None, :],
                 o_MD.to(o_ptr.dtype.element_ty), mask=row_mask)
