"""The paged cache of multi-head latent attention: one latent per token per layer, shared by all heads.

Shape legend: NB blocks in the pool, BS block size, C = kv_lora_rank + qk_rope_head_dim values per token (the
normalised latent ``c_kv``, then the roped key part ``k_pe``), T tokens of the step.
"""

from __future__ import annotations

import torch

from serve.models.config import DecoderConfig
from serve.models.paged_pool import PagedPool


class LatentKVCache(PagedPool):
    """``latent[layer]``: ``[NB + 1, BS, C]``, one view of ``pool`` ``[layers, NB + 1, BS, C]``.

    Same block tables, slots and null block as ``PagedKVCache`` (:class:`PagedPool`): slot ``s`` is
    ``latent[layer].view(-1, C)[s]``. A token costs ``C`` values per layer, for all heads at once (DeepSeek-V3:
    576, where its 128 heads of K and V would cost 128 x (192 + 128)).
    """

    block_dim = 1

    def __init__(self, config: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        if config.mla is None:
            raise ValueError(f"LatentKVCache needs an MLA model; {config.architecture} has no mla config")
        super().__init__(config, num_blocks, block_size, dtype, device)
        self.latent = self.pool

    @staticmethod
    def pool_shape(config: DecoderConfig, blocks: int, block_size: int) -> tuple[int, ...]:
        assert config.mla is not None
        return config.num_layers, blocks, block_size, config.mla.latent_size

    def write(self, layer: int, slot_mapping_T: torch.Tensor, latent_TC: torch.Tensor) -> None:
        """Store the step's latents of ``layer`` in their slots (torch ``index_copy_``, any device)."""
        cache = self.latent[layer]
        cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping_T, latent_TC.to(cache.dtype))
