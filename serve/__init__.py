"""serve: an MoE serving engine with a paged KV cache, continuous batching and chunked prefill.

``serve.LLM(model=None, **options).generate(prompts, serve.SamplingParams(...))``; ``LLMEngine`` for servers.

Four rooms, each importing only the ones below it: ``launch`` (the ``moe-serve`` Hydra entry, launchers,
distributed ranks, the typed schema) -> ``http`` (the OpenAI-compatible server) -> ``engine`` (scheduling, the
KV block manager, sampling) -> ``models`` (decoders, paged attention and its kernels, the checkpoint loader).
"""

from serve.engine import LLM, EngineConfig, LLMEngine, QueueFullError, RequestOutput, SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "QueueFullError", "RequestOutput", "SamplingParams"]
