"""Where the engine runs: ``engine.device`` resolved against the machine, and the KV pool sized for it.

``auto`` is the first CUDA GPU when torch sees one, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as
given and checked here (the config only checks the spelling: configs never probe hardware). On CUDA the KV
pool takes what ``gpu_memory_utilization`` of the GPU leaves free after the weights are loaded, as vLLM's
option of the same name does; on the CPU a byte budget (``kv_cache_bytes``, default 128 MiB).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("moe-serve")

CPU_KV_CACHE_BYTES = 128 * 2**20
# The block manager keeps a Python object per block: a small model on a large GPU would otherwise get tens of
# millions (seconds to build, GBs of host memory). 2**20 blocks of 16 are 16M tokens of context.
MAX_KV_BLOCKS = 2**20


def resolve_device(spec: str) -> torch.device:
    """``engine.device`` -> a device this machine has; ``ValueError`` naming the key otherwise."""
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"engine.device ({spec!r}) needs a CUDA GPU, and torch sees none on this machine "
                             "(use engine.device=auto or cpu)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"engine.device ({spec!r}): this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        device = torch.device("cuda", index)
    return device


def kv_cache_budget(device: torch.device, kv_cache_bytes: int | None, gpu_memory_utilization: float) -> int:
    """Bytes for the KV pool: ``kv_cache_bytes`` when given; else on CUDA, after the weights are loaded, the free
    memory minus the ``1 - gpu_memory_utilization`` share of the GPU kept for activations and other processes;
    else ``CPU_KV_CACHE_BYTES``."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    if device.type != "cuda":
        return CPU_KV_CACHE_BYTES
    free, total = torch.cuda.mem_get_info(device)
    budget = int(free - (1 - gpu_memory_utilization) * total)
    if budget <= 0:
        raise ValueError(f"engine.gpu_memory_utilization ({gpu_memory_utilization}) leaves no memory for the KV "
                         f"cache: {free / 2**30:.1f} of {total / 2**30:.1f} GiB are free after loading the model")
    return budget


def kv_cache_blocks(device: torch.device, kv_cache_bytes: int | None, gpu_memory_utilization: float,
                    bytes_per_block: int) -> int:
    """Blocks of the KV pool: :func:`kv_cache_budget` over ``bytes_per_block``, at most ``MAX_KV_BLOCKS``."""
    blocks = kv_cache_budget(device, kv_cache_bytes, gpu_memory_utilization) // bytes_per_block
    if blocks > MAX_KV_BLOCKS:
        log.info("KV cache: %d blocks fit in memory; using %d (MAX_KV_BLOCKS)", blocks, MAX_KV_BLOCKS)
    return min(blocks, MAX_KV_BLOCKS)
