"""The MLA step of the torch-based attention backends: store the step's latents, decode absorbed, prefill expanded.

Shape legend as :mod:`serve.models.mla` (T, H, N, R, V, L, C), B decoding sequences, NB blocks, BS block size,
S key slots of a gathered block table. Decodes attend in the latent space (``latent_attention``: two batched
matmuls over the gathered latents); prefill chunks expand K and V from the latents of the chunk and, for chunks
over a cached prefix, of the prefix read back through the block table.
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


def gathered_latent_decode(q_lat_BHC: torch.Tensor, cache_NBC: torch.Tensor, group,
                           mask_B11S: torch.Tensor | None, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """``o_lat_BHL`` of a padded decode group (an ``attention.DecodeGroup``; untyped here, as that module imports
    this one): its blocks gathered from one layer's cache ``[NB + 1, BS, C]``."""
    B, C = q_lat_BHC.shape[0], cache_NBC.shape[-1]
    latent_BSC = cache_NBC.index_select(0, group.tables_BM.view(-1)).view(B, -1, C)
    return latent_attention(q_lat_BHC, latent_BSC, kv_lora_rank, scale, mask_B11S)


class TorchMLAStep:
    """``MLAStepAttention`` of the torch-based backends (``metadata``: the step's ``attention.AttentionMetadata``);
    each decode group is padded to its longest sequence and masked. ``absorb_decodes=False`` decodes the naive
    way (``mla.expanded_decode``), for the benchmark's comparison."""

    def __init__(self, cache: LatentKVCache, metadata, absorb_decodes: bool = True) -> None:
        if not isinstance(cache, LatentKVCache):
            raise TypeError(f"an MLA step needs a LatentKVCache, got {type(cache).__name__}")
        self.cache, self.metadata, self.absorb_decodes = cache, metadata, absorb_decodes
        self.masks: dict[int, torch.Tensor] = {}  # per decode group, built in the first layer

    def _decode(self, i: int, q_nope_BHN: torch.Tensor, q_pe_BHR: torch.Tensor, cache_NBC: torch.Tensor,
                w: MLAWeights) -> torch.Tensor:
        group = self.metadata.decodes[i]
        if i not in self.masks:
            self.masks[i] = group.mask_B11S()
        if not self.absorb_decodes:
            latent_BSC = cache_NBC.index_select(0, group.tables_BM.view(-1)).view(group.tables_BM.shape[0], -1,
                                                                                   cache_NBC.shape[-1])
            return expanded_decode(q_nope_BHN, q_pe_BHR, latent_BSC, w, self.masks[i])
        q_lat_BHC = absorb_queries(q_nope_BHN, q_pe_BHR, w)
        L = w.kv_b_weight.shape[-1]
        o_lat_BHL = gathered_latent_decode(q_lat_BHC, cache_NBC, group, self.masks[i], L, w.scale)
        return unabsorb_output(o_lat_BHL, w)

    def attend_latent(self, layer: int, q_nope_THN: torch.Tensor, q_pe_THR: torch.Tensor, latent_TC: torch.Tensor,
                      w: MLAWeights) -> torch.Tensor:
        meta = self.metadata
        self.cache.write(layer, meta.slot_mapping_T, latent_TC)
        cache_NBC = self.cache.latent[layer]
        if len(meta.decodes) == 1 and not meta.prefills:
            return self._decode(0, q_nope_THN, q_pe_THR, cache_NBC, w)
        T, H, V = q_nope_THN.shape[0], w.heads, w.w_uv_HVL.shape[1]
        o_THV = q_nope_THN.new_empty(T, H, V)
        for i, group in enumerate(meta.decodes):
            rows = slice(group.start, group.start + group.tables_BM.shape[0])
            o_THV[rows] = self._decode(i, q_nope_THN[rows], q_pe_THR[rows], cache_NBC, w)
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            if chunk.num_cached == 0:  # nothing to read back: the chunk's own latents, causal
                o_THV[rows] = expanded_attention(q_nope_THN[rows], q_pe_THR[rows], latent_TC[rows], w, None)
                continue
            total = chunk.num_cached + chunk.num_tokens
            latent_SC = cache_NBC.index_select(0, chunk.block_table).view(-1, cache_NBC.shape[-1])[:total]
            # query i (at position num_cached + i) sees keys 0 .. num_cached + i
            keys_S = torch.arange(total, device=latent_SC.device)
            queries_T = chunk.num_cached + torch.arange(chunk.num_tokens, device=keys_S.device)
            mask_TS = keys_S[None, :] <= queries_T[:, None]
            o_THV[rows] = expanded_attention(q_nope_THN[rows], q_pe_THR[rows], latent_SC, w, mask_TS)
        return o_THV
