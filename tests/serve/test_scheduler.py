"""Continuous batching without a model: token budgets, chunked prefill, decode priority, limits, preemption."""

from __future__ import annotations

import pytest

from serve.engine.block_manager import BlockManager
from serve.engine.config import EngineConfig
from serve.engine.sampling_params import SamplingParams
from serve.engine.scheduler import QueueFullError, Scheduler
from serve.engine.sequence import Sequence, SequenceStatus


def _make(num_blocks=64, block_size=4, **options) -> Scheduler:
    config = EngineConfig(model="unused", block_size=block_size, **options)
    return Scheduler(config, BlockManager(num_blocks, block_size, config.enable_prefix_caching))


def _add(sched: Scheduler, name: str, prompt_len: int, max_tokens: int = 4, start: int = 0) -> Sequence:
    seq = Sequence(name, list(range(start, start + prompt_len)), SamplingParams(max_tokens=max_tokens),
                   len(sched))
    sched.add(seq)
    return seq


def _step(sched: Scheduler):
    """One scheduling step with a fake model: computed tokens advance; a finished prompt emits token 7."""
    out = sched.schedule()
    for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
        seq.num_computed += n
        sched.blocks.register_full_blocks(seq)
        if seq.num_computed == seq.num_tokens:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
    return out


def test_chunked_prefill_under_token_budget_with_decodes_first():
    sched = _make(max_num_batched_tokens=16, max_num_seqs=4)
    short = _add(sched, "short", 3, max_tokens=10)
    out = _step(sched)
    assert out.num_new_tokens == [3]
    long = _add(sched, "long", 40, start=100)
    plan = []
    for _ in range(4):
        out = _step(sched)
        plan.append([(s.request_id, n) for s, n in zip(out.seqs, out.num_new_tokens, strict=True)])
    # the decode goes first every step; the 40-token prompt fills the rest of the budget in chunks
    assert plan == [[("short", 1), ("long", 15)], [("short", 1), ("long", 15)], [("short", 1), ("long", 10)],
                    [("short", 1), ("long", 1)]]
    assert long.num_output_tokens == 2 and short.num_output_tokens == 5


def test_max_num_seqs_and_queue_limit():
    sched = _make(max_num_batched_tokens=64, max_num_seqs=2, max_queued_requests=3)
    seqs = [_add(sched, str(i), 5, start=10 * i) for i in range(3)]
    with pytest.raises(QueueFullError, match="max_queued_requests"):
        _add(sched, "overflow", 5)
    out = _step(sched)
    assert [s.request_id for s in out.seqs] == ["0", "1"] and seqs[2].status is SequenceStatus.WAITING
    while len(sched):
        out = _step(sched)
        assert len(out.seqs) <= 2
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


def test_preemption_by_recompute_frees_the_newest_and_requeues_it_first():
    sched = _make(num_blocks=6, block_size=4, max_num_batched_tokens=64, max_num_seqs=4,
                  enable_prefix_caching=False)
    old = _add(sched, "old", 8, max_tokens=12)
    new = _add(sched, "new", 8, max_tokens=12, start=50)
    _step(sched)
    assert sched.blocks.num_free_blocks == 2  # 2 + 2 blocks used, each sequence now has 9 tokens
    preempted = []
    while old.status is not SequenceStatus.FINISHED:
        out = _step(sched)
        preempted += [s.request_id for s in out.preempted]
    assert preempted and set(preempted) == {"new"}
    assert new.num_preemptions >= 1 and sched.num_preemptions == len(preempted)
    while len(sched):
        _step(sched)
    assert new.num_output_tokens == 12 and old.num_output_tokens == 12
    assert sched.blocks.num_free_blocks == 6


def test_abort_waiting_and_running_returns_blocks():
    sched = _make(max_num_batched_tokens=8, max_num_seqs=4)
    a, b = _add(sched, "a", 20), _add(sched, "b", 6, start=30)
    _step(sched)  # a gets an 8-token chunk, b waits for budget
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert len(sched) == 0 and sched.blocks.num_free_blocks == sched.blocks.num_blocks
