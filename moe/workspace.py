"""Reusable scratch memory for the CPU path's large intermediates (one buffer per name and thread).

Why: glibc serves allocations above 32 MB with a fresh ``mmap`` every time, and the first touch of each fresh
4 KB page faults. A prefill-sized expert block's ``h_R2F`` (T=2048 on a Mixtral-shaped layer: 92 MB) cost
~35 ms of page faults per forward that way, a tenth of the layer. A scratch buffer is faulted in once and
reused by every later call on the same thread.

Only for intermediates that never leave the function that asks for them: the next request for the same name on
the thread overwrites the memory. Inside and outside ``torch.inference_mode`` a name has separate buffers. The
largest size asked for stays allocated until :func:`release_scratch`.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised contiguous ``shape`` tensor backed by this thread's buffer ``name`` (grown on demand)."""
    buffers = _local.__dict__.setdefault("buffers", {})
    # a buffer made under inference_mode is an inference tensor, which must not be written outside of it
    key = (name, dtype, torch.device(device), torch.is_inference_mode_enabled())
    numel = 1
    for size in shape:
        numel *= size
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:  # grow by >= 1.5x: a few reallocations for a growing batch
        grown = numel if buffer is None else max(numel, buffer.numel() * 3 // 2)
        buffer = buffers[key] = torch.empty(grown, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def release_scratch() -> None:
    """Frees this thread's scratch buffers (the next :func:`scratch` allocates afresh)."""
    _local.__dict__.pop("buffers", None)
