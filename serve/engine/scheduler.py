"""``Scheduler``: continuous (iteration-level) batching with chunked prefill and preemption by recompute.

Each step spends a budget of ``max_num_batched_tokens``: first one token for every running sequence that is
decoding, then the rest of running sequences' prompts, then new sequences from the queue (oldest first,
round-robin between clients: :mod:`serve.engine.fair_share`), their prompts cut into chunks that fit the budget.
A sequence whose next tokens find no free KV block preempts the newest running sequence: its blocks go back to
the pool and it re-queues at the front to be recomputed (its blocks usually come straight back from the prefix
cache); so does the newest of a client holding far more of a full batch than a waiting one. Sequences that share
a prompt with a ``prefix_source`` (the other choices of an ``n > 1`` request) stay queued until the source has
computed it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serve.engine import fair_share
from serve.engine.block_manager import BlockManager
from serve.engine.config import EngineConfig
from serve.engine.sequence import Sequence, SequenceStatus


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queued_requests`` requests; retry later (HTTP 503)."""


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """``first_key(pos)``: the first key a query at ``pos`` sees in any layer, for a model whose every layer has an
    attention window (None: some layer sees everything); a running sequence's blocks before its next query's first
    key go back to the pool before it is scheduled."""

    def __init__(self, config: EngineConfig, blocks: BlockManager,
                 first_key: Callable[[int], int] | None = None, max_model_len: int | None = None) -> None:
        self.config = config
        self.blocks = blocks
        self.first_key = first_key
        self.max_model_len = max_model_len or config.max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_queued_requests:
            raise QueueFullError(f"max_queued_requests ({self.config.max_queued_requests}) requests are waiting")
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire ``seq`` (finished or aborted) and return its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            seq.prefix_source = None  # admitted: a later recompute (preemption) need not wait for it again
        self.blocks.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        for seq in fair_share.victims(self.waiting, self.running, self.config.max_num_seqs, _awaits_prefix_source):
            self._preempt(seq, out)  # a seat for a client that runs far fewer sequences than this one's
        fair = len(out.preempted)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if len(out.preempted) == fair:  # nothing preempted for want of KV blocks: admit from the queue
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1 and not self._ends_pending(s)]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        queue = deque(decoding + prefilling)
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self.first_key is not None:
                self.blocks.release_passed(seq, self.first_key(seq.num_computed))
            while not self.blocks.ensure_slots(seq, n):
                victim = max([*queue, seq], key=lambda s: s.arrival)  # the newest not yet scheduled this step
                if victim is not seq:
                    queue.remove(victim)
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                budget -= n
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        for seq in fair_share.admission_order(self.waiting, self.running):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if _awaits_prefix_source(seq) or seq.has_pending_token:  # preempted while its next token computes
                continue
            hits = self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - self.blocks.cached_tokens(seq, hits), budget)
            if not self.blocks.can_admit(seq, hits, n):
                break
            self.waiting.remove(seq)
            seq.prefix_source = None  # admitted: a later recompute (preemption) need not wait for it again
            cached = self.blocks.admit(seq, hits)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = cached
            seq.num_computed = cached
            if not self.blocks.ensure_slots(seq, n):  # can_admit counted these blocks
                raise AssertionError(f"sequence {seq.request_id}: admitted without room for {n} tokens")
            seq.status = SequenceStatus.RUNNING
            if seq.times.scheduled is None:  # first admission; a preempted sequence keeps its first
                seq.times.scheduled = time.monotonic()
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n

    def _ends_pending(self, seq: Sequence) -> bool:
        """Whether the token a launched step computes for ``seq`` (overlapped steps: :mod:`serve.engine.overlap`)
        will be its last by length, so it needs no further step."""
        if not seq.has_pending_token:
            return False
        return seq.num_output_tokens >= seq.params.max_tokens or (
            self.max_model_len is not None and seq.num_tokens >= self.max_model_len)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)


def _awaits_prefix_source(seq: Sequence) -> bool:
    """A sibling (another of ``n`` choices) waits until its source has computed the shared prompt, then takes
    the prompt's full blocks from the prefix cache instead of computing them again."""
    src = seq.prefix_source
    return src is not None and not src.is_finished and src.num_computed < src.num_prompt_tokens
