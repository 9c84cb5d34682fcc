"""The block pool both paged caches share: one tensor, its block dimension, and the null block.

``PagedKVCache`` (:mod:`serve.models.attention`: K and V per kv head) and ``LatentKVCache``
(:mod:`serve.models.latent_cache`: one MLA latent per token) differ only in what a block holds; the block tables,
slots, copy-on-write copies and the null block of CUDA-graph padding are this class's.
"""

from __future__ import annotations

import torch

from serve.models.config import DecoderConfig


class PagedPool:
    """``pool``: zeros shaped ``pool_shape(config, NB + 1, BS)``, whose dimension ``block_dim`` indexes blocks.

    Block ``NB`` (``null_block``) belongs to no sequence: the rows that pad a step to a CUDA-graph size write
    there (``null_slot``) and read only it. Subclasses say the shape and how a step's values are stored.
    """

    block_dim: int

    def __init__(self, config: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.pool = torch.zeros(self.pool_shape(config, num_blocks + 1, block_size), dtype=dtype, device=device)
        self.block_size = block_size
        self.null_block = num_blocks
        self.null_slot = num_blocks * block_size

    @staticmethod
    def pool_shape(config: DecoderConfig, blocks: int, block_size: int) -> tuple[int, ...]:
        raise NotImplementedError

    @classmethod
    def bytes_per_block(cls, config: DecoderConfig, block_size: int, dtype: torch.dtype) -> int:
        values = 1
        for n in cls.pool_shape(config, 1, block_size):
            values *= n
        return values * torch.empty((), dtype=dtype).element_size()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block ``dst`` becomes a copy of ``src`` for each pair, in every layer."""
        if copies:
            # from host lists to the device, non-blocking: no sync
            src = torch.tensor([s for s, _ in copies]).to(self.pool.device, non_blocking=True)  # host list
            dst = torch.tensor([d for _, d in copies]).to(self.pool.device, non_blocking=True)  # host list
            self.pool.index_copy_(self.block_dim, dst, self.pool.index_select(self.block_dim, src))
