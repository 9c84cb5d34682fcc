"""What the engine returns for a request: ``RequestOutput`` (``.text``, ``.token_ids``, ``.finished``, ...)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestTimes:
    """When one request passed each point of its life, in ``time.monotonic()`` seconds (vLLM's request stats).

    ``arrival``: the caller received it (the server passes when its HTTP request was parsed and tokenized);
    ``queued``: ``add_request``; ``scheduled``: first scheduled (a preemption does not move it); ``first_token`` /
    ``last_token``: the steps that produced them; ``prev_token``: the step before ``last_token``'s, None until there
    are two. Queue time is ``scheduled - queued``, prefill ``first_token - scheduled``, decode ``last_token -
    first_token``, the last inter-token latency ``last_token - prev_token``. Taken on the host between steps, never
    inside the forward pass.
    """

    arrival: float = field(default_factory=time.monotonic)
    queued: float = field(default_factory=time.monotonic)
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    prev_token: float | None = None

    def copy(self) -> RequestTimes:
        """A snapshot (what an output carries); ``dataclasses.replace`` costs ~4x this, per output and step."""
        return RequestTimes(self.arrival, self.queued, self.scheduled, self.first_token, self.last_token,
                            self.prev_token)

    def on_token(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
        self.prev_token, self.last_token = self.last_token, now


@dataclass
class RequestOutput:
    """One request's generated tokens so far (all of them when ``finished``).

    ``text`` is the detokenized output (empty for a model served without a tokenizer); while a request runs it is
    kept current only for requests with stop strings (stream ``new_token_ids`` through
    :class:`serve.engine.tokenizer.IncrementalDetokenizer` otherwise). ``finish_reason`` is
    ``"stop"`` (EOS, stop token or stop string: ``stop_reason`` says which), ``"length"`` (``max_tokens`` or
    the context limit) or ``"abort"``. ``logprobs[i]`` maps token id -> log-probability for output token ``i``
    (the chosen token first) when requested. ``num_cached_tokens``: prompt tokens served from the prefix cache.
    ``times``: a copy of the request's :class:`RequestTimes` as of this output; ``num_preemptions``: how often it
    was preempted so far.
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
    times: RequestTimes = field(default_factory=RequestTimes)
    num_preemptions: int = 0
