"""The MLA step of the torch-based attention backends: store the step's latents, decode absorbed, prefill expanded.

Shape legend as :mod:`serve.models.mla` (T, H, N, R, V, L, C), B decoding sequences, NB blocks, BS block size,
S key slots of a gathered block table. Decodes attend in the latent space (``latent_attention``: two batched
matmuls over the gathered latents); prefill chunks expand K and V from the latents of the chunk and, for chunks
over a cached prefix, of the prefix read back through the block table.

DeepSeek Sparse Attention (``index`` given, :mod:`serve.models.sparse_attention`): once a query may see more than
``index_topk`` keys, a decode attends absorbed over the latents of its selected slots only (gathered, ``K`` of
them), a prefill chunk expanded under the mask of its selection. A GLM-5 shared layer reuses the selection its
decode group or chunk got in the last layer that ran an indexer (``selected``, per step).
"""

from __future__ import annotations

import torch

from serve.models.latent_cache import LatentKVCache
from serve.models.mla import (
    MLAWeights,
    absorb_queries,
    expanded_attention,
    expanded_decode,
    latent_attention,
    unabsorb_output,
)
from serve.models.sparse_attention import IndexerQuery, decode_selection, prefill_selection


def gathered_latent_decode(q_lat_BHC: torch.Tensor, cache_NBC: torch.Tensor, group,
                           mask_B11S: torch.Tensor | None, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """``o_lat_BHL`` of a padded decode group (an ``attention.DecodeGroup``; untyped here, as that module imports
    this one): its blocks gathered from one layer's cache ``[NB + 1, BS, C]``."""
    B, C = q_lat_BHC.shape[0], cache_NBC.shape[-1]
    latent_BSC = cache_NBC.index_select(0, group.tables_BM.view(-1)).view(B, -1, C)
    return latent_attention(q_lat_BHC, latent_BSC, kv_lora_rank, scale, mask_B11S)


def _rows(index: IndexerQuery | None, rows: slice) -> IndexerQuery | None:
    return None if index is None else index.rows(rows)


class TorchMLAStep:
    """``MLAStepAttention`` of the torch-based backends (``metadata``: the step's ``attention.AttentionMetadata``);
    each decode group is padded to its longest sequence and masked. ``absorb_decodes=False`` decodes the naive
    way (``mla.expanded_decode``), for the benchmark's comparison."""

    def __init__(self, cache: LatentKVCache, metadata, absorb_decodes: bool = True) -> None:
        if not isinstance(cache, LatentKVCache):
            raise TypeError(f"an MLA step needs a LatentKVCache, got {type(cache).__name__}")
        self.cache, self.metadata, self.absorb_decodes = cache, metadata, absorb_decodes
        self.masks: dict[int, torch.Tensor] = {}  # per decode group, built in the first layer
        self.selected: dict[tuple[str, int], torch.Tensor] = {}  # DSA: per decode group / chunk, the last choice

    def _decode(self, i: int, q_nope_BHN: torch.Tensor, q_pe_BHR: torch.Tensor, layer: int, w: MLAWeights,
                index: IndexerQuery | None) -> torch.Tensor:
        group, cache_NBC = self.metadata.decodes[i], self.cache.latent[layer]
        if i not in self.masks:
            self.masks[i] = group.mask_B11S()
        mask_B11S = self.masks[i]
        B, C = group.tables_BM.shape[0], cache_NBC.shape[-1]
        latent_BSC = None
        if index is not None and group.tables_BM.shape[1] * group.block_size > index.topk:
            latent_BSC, mask_B11S = self._sparse_decode(i, layer, index)
        if not self.absorb_decodes:
            if latent_BSC is None:
                latent_BSC = cache_NBC.index_select(0, group.tables_BM.view(-1)).view(B, -1, C)
            return expanded_decode(q_nope_BHN, q_pe_BHR, latent_BSC, w, mask_B11S)
        q_lat_BHC = absorb_queries(q_nope_BHN, q_pe_BHR, w)
        L = w.kv_b_weight.shape[-1]
        if latent_BSC is None:
            o_lat_BHL = gathered_latent_decode(q_lat_BHC, cache_NBC, group, mask_B11S, L, w.scale)
        else:
            o_lat_BHL = latent_attention(q_lat_BHC, latent_BSC, L, w.scale, mask_B11S)
        return unabsorb_output(o_lat_BHL, w)

    def _sparse_decode(self, i: int, layer: int, index: IndexerQuery) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents of the K selected slots ``[B, K, C]``, their mask ``[B, 1, 1, K]``) of decode group ``i``."""
        group = self.metadata.decodes[i]
        B, blocks = group.tables_BM.shape[0], group.tables_BM.view(-1)
        valid_BS = torch.arange(group.tables_BM.shape[1] * group.block_size,
                                device=blocks.device)[None, :] < group.lens_B[:, None]
        if index.q_TIJ is not None:
            index_keys = self.cache.index_keys[layer]
            keys_BSJ = index_keys.index_select(0, blocks).view(B, -1, index_keys.shape[-1])
            self.selected["decode", i] = decode_selection(index, keys_BSJ, valid_BS)
        keys_BK = self.selected["decode", i]
        latent = self.cache.latent[layer]
        latent_BSC = latent.index_select(0, blocks).view(B, -1, latent.shape[-1])
        latent_BKC = latent_BSC.gather(1, keys_BK[..., None].expand(-1, -1, latent_BSC.shape[-1]))
        # a sequence with fewer than K keys was also given padding slots: masked
        padding_BK = ~valid_BS.gather(1, keys_BK)
        mask_BK = torch.zeros(padding_BK.shape, device=padding_BK.device).masked_fill_(padding_BK, float("-inf"))
        return latent_BKC, mask_BK[:, None, None]

    def _prefill_mask(self, j: int, layer: int, index: IndexerQuery | None, total: int,
                      causal_TS: torch.Tensor | None) -> torch.Tensor | None:
        """The mask of prefill chunk ``j`` (None: causal over the chunk alone): its DSA selection once a query may
        see more than ``index_topk`` keys."""
        if index is None or total <= index.topk:
            return causal_TS
        chunk = self.metadata.prefills[j]
        if causal_TS is None:
            keys_S = torch.arange(total, device=chunk.block_table.device)
            causal_TS = keys_S[None, :] <= keys_S[:, None]
        if index.q_TIJ is not None:
            index_keys = self.cache.index_keys[layer]
            keys_SJ = index_keys.index_select(0, chunk.block_table).view(-1, index_keys.shape[-1])[:total]
            self.selected["prefill", j] = prefill_selection(index, keys_SJ, causal_TS)
        return self.selected["prefill", j]

    def attend_latent(self, layer: int, q_nope_THN: torch.Tensor, q_pe_THR: torch.Tensor, latent_TC: torch.Tensor,
                      w: MLAWeights, index: IndexerQuery | None = None) -> torch.Tensor:
        meta = self.metadata
        self.cache.write(layer, meta.slot_mapping_T, latent_TC, None if index is None else index.k_TJ)
        cache_NBC = self.cache.latent[layer]
        if len(meta.decodes) == 1 and not meta.prefills:
            return self._decode(0, q_nope_THN, q_pe_THR, layer, w, index)
        T, H, V = q_nope_THN.shape[0], w.heads, w.w_uv_HVL.shape[1]
        o_THV = q_nope_THN.new_empty(T, H, V)
        for i, group in enumerate(meta.decodes):
            rows = slice(group.start, group.start + group.tables_BM.shape[0])
            o_THV[rows] = self._decode(i, q_nope_THN[rows], q_pe_THR[rows], layer, w, _rows(index, rows))
        for j, chunk in enumerate(meta.prefills):
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            total, chunk_index = chunk.num_cached + chunk.num_tokens, _rows(index, rows)
            if chunk.num_cached == 0:  # nothing to read back: the chunk's own latents, causal
                mask_TS = self._prefill_mask(j, layer, chunk_index, total, None)
                o_THV[rows] = expanded_attention(q_nope_THN[rows], q_pe_THR[rows], latent_TC[rows], w, mask_TS)
                continue
            latent_SC = cache_NBC.index_select(0, chunk.block_table).view(-1, cache_NBC.shape[-1])[:total]
            # query i (at position num_cached + i) sees keys 0 .. num_cached + i
            keys_S = torch.arange(total, device=latent_SC.device)
            queries_T = chunk.num_cached + torch.arange(chunk.num_tokens, device=keys_S.device)
            mask_TS = self._prefill_mask(j, layer, chunk_index, total, keys_S[None, :] <= queries_T[:, None])
            o_THV[rows] = expanded_attention(q_nope_THN[rows], q_pe_THR[rows], latent_SC, w, mask_TS)
        return o_THV
