"""``Sequence``: one request's tokens and its place in the scheduler and the paged KV cache."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from serve.engine.outputs import RequestTimes
from serve.engine.sampling_params import SamplingParams


class SequenceStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt + generated tokens; ``num_computed`` of them have their K/V in the blocks of ``block_table``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order; lower is older (scheduling priority)
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_keys: list[tuple] = field(default_factory=list)  # prefix-cache keys of the full blocks so far
    num_registered: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_released: int = 0  # leading blocks returned as every layer's window passed them (null in block_table)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = -1  # prefix-cache hit on first admission; -1 until admitted
    num_preemptions: int = 0
    generator: torch.Generator | None = None  # a seeded request's own, made by the sampler on its first draw
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""  # detokenized output so far (kept up to date only where stop strings need it)
    detok_state: object = None
    prefix_source: Sequence | None = None  # same prompt, computed first; this one reuses its cached blocks
    client: str | None = None  # the sub-requests of one HTTP request share one; fair shares (engine.fair_share)
    matcher: object = None  # params.json_schema's llguidance matcher, advanced with each token (engine.structured)
    times: RequestTimes = field(default_factory=RequestTimes)  # arrival, first scheduled, tokens (metrics)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def has_pending_token(self) -> bool:
        """Its last token is a placeholder for one a launched step is computing (:mod:`serve.engine.overlap`)."""
        return self.token_ids[-1] < 0

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
