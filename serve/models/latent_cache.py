"""The paged cache of multi-head latent attention: one latent per token per layer, shared by all heads, and for
DeepSeek Sparse Attention the token's indexer key next to it.

Shape legend: NB blocks in the pool, BS block size, C = kv_lora_rank + qk_rope_head_dim values per token (the
normalised latent ``c_kv``, then the roped key part ``k_pe``), J = index_head_dim (0 without an indexer), T tokens
of the step.
"""

from __future__ import annotations

import torch

from serve.models.config import DecoderConfig
from serve.models.paged_pool import PagedPool


class LatentKVCache(PagedPool):
    """``latent[layer]``: ``[NB + 1, BS, C]``, and ``index_keys[layer]``: ``[NB + 1, BS, J]``, views of one pool
    ``[layers, NB + 1, BS, C + J]``: a slot's row is its latent, then its indexer key.

    Same block tables, slots and null block as ``PagedKVCache`` (:class:`PagedPool`): slot ``s`` is
    ``latent[layer].view(-1, C)[s]``; copy-on-write and the prefix cache move latents and indexer keys together.
    A token costs ``C + J`` values per layer, for all heads at once (DeepSeek-V3: 576, where its 128 heads of K and
    V would cost 128 x (192 + 128); DeepSeek-V3.2: 576 + 128). GLM-5's shared layers leave their ``J`` unused.
    """

    block_dim = 1

    def __init__(self, config: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        if config.mla is None:
            raise ValueError(f"LatentKVCache needs an MLA model; {config.architecture} has no mla config")
        super().__init__(config, num_blocks, block_size, dtype, device)
        C = config.mla.latent_size
        # without an indexer, the whole (contiguous) pool; with one, strided views of its rows
        self.latent = self.pool if config.mla.indexer is None else self.pool[..., :C]
        self.index_keys = self.pool[..., C:]

    @staticmethod
    def pool_shape(config: DecoderConfig, blocks: int, block_size: int) -> tuple[int, ...]:
        assert config.mla is not None
        index_dim = 0 if config.mla.indexer is None else config.mla.indexer.head_dim
        return config.num_layers, blocks, block_size, config.mla.latent_size + index_dim

    def write(self, layer: int, slot_mapping_T: torch.Tensor, latent_TC: torch.Tensor,
              index_keys_TJ: torch.Tensor | None = None) -> None:
        """Store the step's latents of ``layer`` (and its indexer keys) in their slots (torch ``index_copy_``, any
        device)."""
        for cache, values in ((self.latent[layer], latent_TC), (self.index_keys[layer], index_keys_TJ)):
            if values is not None:
                cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping_T, values.to(cache.dtype))
