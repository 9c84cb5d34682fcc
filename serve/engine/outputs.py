"""What the engine returns for a request: ``RequestOutput`` (``.text``, ``.token_ids``, ``.finished``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One request's generated tokens so far (all of them when ``finished``).

    ``text`` is the detokenized output (empty for a model served without a tokenizer); while a request runs it is
    kept current only for requests with stop strings (stream ``new_token_ids`` through
    :class:`serve.engine.tokenizer.IncrementalDetokenizer` otherwise). ``finish_reason`` is
    ``"stop"`` (EOS, stop token or stop string: ``stop_reason`` says which), ``"length"`` (``max_tokens`` or
    the context limit) or ``"abort"``. ``logprobs[i]`` maps token id -> log-probability for output token ``i``
    (the chosen token first) when requested. ``num_cached_tokens``: prompt tokens served from the prefix cache.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0
    new_token_ids: list[int] = field(default_factory=list)  # produced by the step that returned this
