"""serve: an MoE serving engine with a paged KV cache, continuous batching and chunked prefill.

``serve.LLM(model=None, **options).generate(prompts, serve.SamplingParams(...))``; ``LLMEngine`` for servers.

Four rooms, each importing only the ones below it: ``launch`` (the ``moe-serve`` Hydra entry, launchers,
distributed ranks, the typed schema) -> ``http`` (the OpenAI-compatible server) -> ``engine`` (scheduling, the
KV block manager, sampling) -> ``models`` (decoders, paged attention and its kernels, the checkpoint loader).

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): with threads spinning at each barrier,
2 intra-op threads next to one other busy process served 127-983 output tok/s against 1531-1563 passive and
1341-1758 with one thread (``benchmarks/serve_offline``'s workload, default model). The OpenMP runtime reads it
once, when torch loads it: it takes effect where ``serve`` is imported before torch (``moe-serve``, its ranks).
The price is on a quiet machine whose cores are all the engine's: 2 threads served 3474-3638 passive against
7450-7850 with the runtime's default wait (``OMP_WAIT_POLICY=`` empty, or ``ACTIVE``), and 1 thread ~6400 (2 cores,
AVX-512, 2026-12-03). ``moe-serve``'s default, all cores but one, runs the C decode step on one thread: no barriers.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from serve.engine import LLM, EngineConfig, LLMEngine, QueueFullError, RequestOutput, SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "QueueFullError", "RequestOutput", "SamplingParams"]
