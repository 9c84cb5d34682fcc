"""The paged cache of multi-head latent attention: one latent per token per layer, shared by all heads.

Shape legend: NB blocks in the pool, BS block size, C = kv_lora_rank + qk_rope_head_dim values per token (the
normalised latent ``c_kv``, then the roped key part ``k_pe``), T tokens of the step.
"""

from __future__ import annotations

import torch

from serve.models.config import DecoderConfig


class LatentKVCache:
    """``latent[layer]``: ``[NB + 1, BS, C]``, one view of ``pool`` ``[layers, NB + 1, BS, C]``.

    Same block tables, slots and null block as ``PagedKVCache``: slot ``s`` is ``latent[layer].view(-1, C)[s]``;
    block ``NB`` (``null_block``) belongs to no sequence, and the rows that pad a step to a CUDA-graph size write
    their latent to ``null_slot`` and read only it. A token costs ``C`` values per layer, for all heads at once
    (DeepSeek-V3: 576, where its 128 heads of K and V would cost 128 x (192 + 128)).
    """

    def __init__(self, config: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        if config.mla is None:
            raise ValueError(f"LatentKVCache needs an MLA model; {config.architecture} has no mla config")
        shape = (config.num_layers, num_blocks + 1, block_size, config.mla.latent_size)
        self.pool = torch.zeros(shape, dtype=dtype, device=device)
        self.latent = self.pool
        self.block_size = block_size
        self.null_block = num_blocks
        self.null_slot = num_blocks * block_size

    @staticmethod
    def bytes_per_block(config: DecoderConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return config.num_layers * block_size * config.mla.latent_size * elem

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            # from host lists to the device, non-blocking: no sync
            src = torch.tensor([s for s, _ in copies]).to(self.pool.device, non_blocking=True)  # host list
            dst = torch.tensor([d for _, d in copies]).to(self.pool.device, non_blocking=True)  # host list
            self.pool[:, dst] = self.pool[:, src]

    def write(self, layer: int, slot_mapping_T: torch.Tensor, latent_TC: torch.Tensor) -> None:
        """Store the step's latents of ``layer`` in their slots (torch ``index_copy_``, any device)."""
        cache = self.latent[layer]
        cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping_T, latent_TC.to(cache.dtype))
