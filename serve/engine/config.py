"""``EngineConfig``: the serving engine's options (``serve.LLM(model, **options)`` takes these names)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe.config import Quant
from serve.models.attention_backends import ATTENTION_BACKENDS

DEFAULT_MODEL = Path(__file__).parents[1] / "default_model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = tuple(q.value for q in Quant)


@dataclass
class EngineConfig:
    """``model``: a Hugging Face checkpoint directory (None: the embedded default model).

    ``tokenizer``: directory with ``tokenizer.json`` (default: ``model``; a checkpoint without one serves token
    ids only). ``max_model_len``: longest prompt + output (default and limit: the model's
    ``max_position_embeddings``).
    ``device``: ``auto`` (the GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; weights,
    KV cache and sampling live there. ``cuda_graphs``: capture the decode forward in CUDA graphs (CUDA only).
    ``attention_backend``: ``auto`` (Triton on CUDA, the C decode kernel on the CPU), ``torch``, ``cpu`` or
    ``triton`` (see :mod:`serve.models.attention_backends`).
    KV cache: ``num_kv_blocks`` blocks of ``block_size`` tokens, or as many as ``kv_cache_bytes`` holds (default:
    on CUDA what ``gpu_memory_utilization`` of the GPU leaves after the weights, on the CPU 128 MiB).
    Scheduling: at most ``max_num_seqs`` running sequences, ``max_num_batched_tokens`` tokens per step (decodes
    first, prompts chunked into the rest), ``max_queued_requests`` waiting. ``seed`` drives unseeded sampling.
    ``hypermoe``: None serves the checkpoint as it is; True/False require it to be / not be a HyperMoE checkpoint.
    ``quantization``: routed-expert weights in FP8, ``"fp8-block"`` (128x128 block scales) or ``"fp8-channel"``
    (per-row scales); a high-precision checkpoint is quantised while loading. None serves the checkpoint as it is
    (FP8 experts when its ``config.json`` has an FP8 ``quantization_config``).
    ``async_scheduling``: plan step N+1 and finish step N's outputs while step N's forward pass runs on a worker
    thread (:mod:`serve.engine.overlap`); None: on for the CPU when the intra-op threads leave a core for the host
    work (with none left the C step's threads would share it), off on CUDA, whose kernels already run ahead of
    the host.
    """

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    device: str = "auto"
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True
    attention_backend: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_queued_requests: int = 4096
    enable_prefix_caching: bool = True
    seed: int = 0
    hypermoe: bool | None = None
    quantization: str | None = None
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        self.model = str(DEFAULT_MODEL if self.model is None else self.model)
        if self.tokenizer is None and (Path(self.model) / "tokenizer.json").is_file():
            self.tokenizer = self.model
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype ({self.dtype!r}) is not one of: {', '.join(DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization ({self.quantization!r}) is not one of: {', '.join(QUANTIZATIONS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend ({self.attention_backend!r}) is not one of: "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling ({self.async_scheduling!r}) must be true, false or None")
        if not _is_device(self.device):
            raise ValueError(f"device ({self.device!r}) is not one of: auto, cpu, cuda, cuda:N")
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization ({self.gpu_memory_utilization!r}) must be in (0, 1]")
        if self.kv_cache_bytes is not None and (not isinstance(self.kv_cache_bytes, int) or self.kv_cache_bytes < 1):
            raise ValueError(f"kv_cache_bytes ({self.kv_cache_bytes!r}) must be a positive integer or None")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_queued_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ("max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 2):
                raise ValueError(f"{name} ({value!r}) must be an integer >= 2 or None")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}) so every running sequence can decode each step")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _is_device(spec: object) -> bool:
    if not isinstance(spec, str):
        return False
    kind, _, index = spec.partition(":")
    return spec in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit())
