"""``select_attention_backend``: ``engine.attention_backend`` resolved against the cache's device and dtype.

``auto``: Triton on CUDA, the C decode kernel on an fp32 CPU cache where it compiled, else plain torch. A name
asks for that backend and fails in one line where it cannot run (``triton`` on the CPU needs Triton's
interpreter, ``TRITON_INTERPRET=1``: tests only). DeepSeek Sparse Attention models (``sparse_mla``) are served
by the torch MLA step only: ``auto`` skips Triton for them, ``triton`` is refused.
:mod:`serve.models.triton_attention` is imported only when Triton may run: a CPU server never defines its kernels.
"""

from __future__ import annotations

import os

import torch

from serve.models.attention import AttentionBackend, TorchAttention
from serve.models.cpu_attention import CpuAttention, paged_decode_available

ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")


def select_attention_backend(name: str, device: torch.device, dtype: torch.dtype,
                             sparse_mla: bool = False) -> AttentionBackend:
    probe = torch.empty(0, dtype=dtype, device=device)
    if name == "auto":
        triton_backend = _triton_backend(probe) if device.type == "cuda" and not sparse_mla else None
        if triton_backend is not None:
            return triton_backend
        return CpuAttention() if paged_decode_available(probe) else TorchAttention()
    if name == "torch":
        return TorchAttention()
    if name == "cpu":
        if not paged_decode_available(probe):
            raise ValueError(f"engine.attention_backend ('cpu') needs an fp32 CPU cache and the C kernel, got "
                             f"{dtype} on {device} (use auto or torch)")
        return CpuAttention()
    if name == "triton":
        if sparse_mla:
            raise ValueError("engine.attention_backend ('triton') cannot serve DeepSeek Sparse Attention (the model's "
                             "lightning indexer); use auto, torch or cpu")
        backend = _triton_backend(probe)
        if backend is None:
            interpreted = os.environ.get("TRITON_INTERPRET") == "1"
            raise ValueError(f"engine.attention_backend ('triton') needs a CUDA device or TRITON_INTERPRET=1, got "
                             f"{device} (TRITON_INTERPRET={'1' if interpreted else 'unset'}; use auto or torch)")
        return backend
    raise ValueError(f"engine.attention_backend ({name!r}) is not one of: {', '.join(ATTENTION_BACKENDS)}")


def _triton_backend(probe: torch.Tensor) -> AttentionBackend | None:
    if probe.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None  # nothing to import: Triton runs on CUDA or in its interpreter only
    from serve.models.triton_attention import TritonAttention, triton_attention_available  # on use (docstring)

    return TritonAttention() if triton_attention_available(probe) else None
