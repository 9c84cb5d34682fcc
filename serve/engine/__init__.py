"""The engine: ``LLMEngine`` (``add_request`` / ``step`` / ``abort``), the offline ``LLM``, and what one step is
made of: scheduler, KV block manager, sequences, model runner, sampler, stop checks, tokenizer."""

from serve.engine.config import EngineConfig
from serve.engine.engine import LLM, LLMEngine, StepStats
from serve.engine.outputs import RequestOutput
from serve.engine.sampling_params import SamplingParams
from serve.engine.scheduler import QueueFullError

__all__ = ["LLM", "EngineConfig", "LLMEngine", "QueueFullError", "RequestOutput", "SamplingParams", "StepStats"]
