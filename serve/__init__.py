"""serve: an MoE serving engine with a paged KV cache, continuous batching and chunked prefill.

``serve.LLM(model=None, **options).generate(prompts, serve.SamplingParams(...))``; ``LLMEngine`` for servers.
"""

from serve.config import EngineConfig
from serve.engine import LLM, LLMEngine
from serve.outputs import RequestOutput
from serve.sampling_params import SamplingParams
from serve.scheduler import QueueFullError

__all__ = ["LLM", "EngineConfig", "LLMEngine", "QueueFullError", "RequestOutput", "SamplingParams"]
