"""``SamplingParams``: how one request picks its tokens and when it stops (validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request decoding options (vLLM names).

    ``temperature == 0`` is greedy. ``top_k <= 0`` / ``top_p == 1`` / ``min_p == 0`` disable those filters.
    ``seed`` makes sampling reproducible whatever else is in the batch. Generation stops at ``max_tokens``, an
    EOS token (unless ``ignore_eos``), any of ``stop_token_ids``, or any string in ``stop`` (cut from the text
    unless ``include_stop_str_in_output``). ``logprobs=n`` returns the chosen token's log-probability and the
    ``n`` most likely tokens' (from the model's distribution before temperature and filters).
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
