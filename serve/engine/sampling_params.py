"""``SamplingParams``: how one request picks its tokens and when it stops (validated on construction)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5  # below it, sampling is argmax (as vLLM): logits / T would overflow to inf and NaN
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias values; larger ones are clamped


@dataclass
class SamplingParams:
    """Per-request decoding options (vLLM names).

    ``temperature < 1e-5`` is greedy. ``top_k <= 0`` / ``top_p == 1`` / ``min_p == 0`` disable those filters.
    Before them: ``logit_bias`` (token id -> added logit, clamped to [-100, 100]), ``presence_penalty`` /
    ``frequency_penalty`` (OpenAI: subtracted once / per occurrence for tokens in the output so far) and
    ``repetition_penalty`` (vLLM: logits of tokens in the prompt or output divided by it when positive,
    multiplied when negative); these apply to greedy requests too.
    ``seed`` makes sampling reproducible whatever else is in the batch. Generation stops at ``max_tokens``, an
    EOS token (unless ``ignore_eos``), any of ``stop_token_ids``, or any string in ``stop`` (cut from the text
    unless ``include_stop_str_in_output``). ``logprobs=n`` returns the chosen token's log-probability and the
    ``n`` most likely tokens' (from the model's distribution before temperature and filters).
    ``json_schema`` constrains the output to compact JSON text valid against that schema (``{"type": "object"}``:
    any JSON object); the request then finishes when the JSON is complete (EOS is allowed only then).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    json_schema: dict | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its value (the engine re-checks on admission)."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens ({self.max_tokens!r}) must be an integer >= 1")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature ({self.temperature!r}) must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p ({self.top_p!r}) must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p ({self.min_p!r}) must be in [0, 1]")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k ({self.top_k!r}) must be an integer (<= 0 disables it)")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed ({self.seed!r}) must be an integer or None")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs ({self.logprobs!r}) must be an integer >= 0 or None")
        if any(not s for s in self.stop):
            raise ValueError(f"stop ({self.stop!r}) must not contain empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids ({self.stop_token_ids!r}) must be non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise ValueError(f"{name} ({value!r}) must be in [-2, 2]")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty ({self.repetition_penalty!r}) must be > 0 (1 disables it)")
        bias = dict(self.logit_bias or {})
        if any(not isinstance(t, int) or t < 0 for t in bias):
            raise ValueError(f"logit_bias ({bias!r}) keys must be non-negative token ids")
        if any(not (isinstance(v, (int, float)) and math.isfinite(v)) for v in bias.values()):
            raise ValueError(f"logit_bias ({bias!r}) values must be finite numbers")
        self.logit_bias = {t: max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(v))) for t, v in bias.items()}
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"json_schema ({self.json_schema!r}) must be a dict (a JSON schema) or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes or reports the logits: the token is the row's argmax."""
        return self.greedy and not self.penalised and not self.logit_bias and self.logprobs is None
