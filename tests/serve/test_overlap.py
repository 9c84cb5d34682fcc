"""Overlapped steps (``async_scheduling``): the same outputs as one step at a time, and no block kept.

Step N+1 is planned while step N computes (:mod:`serve.engine.overlap`), so a sequence that stops on step N's
token has a wasted row in step N+1, a preemption may pick a sequence whose token is still computing, and an abort
may come while its step runs. Each case runs on the same engine options both ways.
"""

from __future__ import annotations

import pytest
import torch

from serve import LLM, SamplingParams
from serve.engine.model_runner import fill_pending, pending_token


def _run(async_scheduling: bool, requests, aborts: dict[int, str], **options):
    """Add ``requests`` ``(id, prompt, params, prefix_source)``, step until done, abort ``aborts[call]`` after that
    many step calls. Returns each request's final output and the engine."""
    llm = LLM(async_scheduling=async_scheduling, **options)
    engine = llm.engine
    for request_id, prompt, params, source in requests:
        engine.add_request(request_id, prompt, params, prefix_source=source)
    final, calls = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        calls += 1
        if calls in aborts:
            out = engine.abort(aborts[calls])
            if out is not None:
                final[out.request_id] = out
    return final, engine


def _assert_idle(engine) -> None:
    engine.step()  # an overlapped engine may still compute a wasted step; this collects it
    assert not engine.requests and len(engine.scheduler) == 0 and engine._in_flight is None
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        x, y = a[rid], b[rid]
        assert (x.token_ids, x.finish_reason, x.stop_reason, x.text) == (y.token_ids, y.finish_reason,
                                                                          y.stop_reason, y.text), rid
        assert all(min(t) >= 0 for t in (x.token_ids, y.token_ids) if t)
        if x.logprobs is not None:
            assert [list(d) for d in x.logprobs] == [list(d) for d in y.logprobs], rid


SHARED = "def main():\n" + "    x += 1\n" * 8  # longer than a block: the sibling reuses its first blocks
MIXED = [
    ("eos", SHARED, SamplingParams(max_tokens=96, temperature=0.0), None),  # stops on EOS
    ("stop-str", "import os\nimport", SamplingParams(max_tokens=64, temperature=0.0, stop=["\n"]), None),
    ("stop-id", "class A:\n", SamplingParams(max_tokens=64, temperature=0.0, stop_token_ids=[25]), None),
    ("seeded", "for i in range(", SamplingParams(max_tokens=40, temperature=0.9, seed=7), None),
    ("logprobs", "x = [", SamplingParams(max_tokens=20, temperature=0.0, logprobs=3), None),
    ("penalised", "def f(x):", SamplingParams(max_tokens=30, temperature=0.0, frequency_penalty=0.5), None),
    ("long", "while True:\n", SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True), None),
    ("aborted", "try:\n", SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), None),
    ("sibling", SHARED, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), "eos"),
]


def test_overlapped_steps_give_the_same_outputs_and_return_every_block():
    runs = [_run(mode, MIXED, {9: "aborted"}, max_num_seqs=8, max_num_batched_tokens=64) for mode in (False, True)]
    (sync, _), (overlapped, engine) = runs
    _same(sync, overlapped)
    assert sync["aborted"].finish_reason == "abort" and 0 < len(sync["aborted"].token_ids) < 200
    assert {o.finish_reason for o in sync.values()} == {"stop", "length", "abort"}
    assert overlapped["sibling"].num_cached_tokens == sync["sibling"].num_cached_tokens > 0
    _assert_idle(engine)


def test_preemption_under_overlap():
    """12 sequences on 28 blocks of 16: they preempt each other; each is recomputed, nothing leaks."""
    requests = [(f"r{i}", [1 + i] * 40, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True), None)
                for i in range(12)]
    (sync, _), (overlapped, engine) = (_run(mode, requests, {}, max_num_seqs=12, num_kv_blocks=28,
                                            max_model_len=128) for mode in (False, True))
    _same(sync, overlapped)
    assert engine.scheduler.num_preemptions > 0
    assert all(len(o.token_ids) == 60 for o in overlapped.values())
    _assert_idle(engine)


def test_a_sequence_at_max_tokens_is_not_scheduled_again():
    """Its last token computing, the next plan leaves it out: no wasted row, as many steps as without overlap."""
    requests = [(f"r{i}", [3, 4, 5 + i], SamplingParams(max_tokens=5 + 3 * i, temperature=0.0, ignore_eos=True),
                 None) for i in range(4)]
    steps = []
    for mode in (False, True):
        final, engine = _run(mode, requests, {})
        assert [len(final[f"r{i}"].token_ids) for i in range(4)] == [5, 8, 11, 14]
        steps.append(engine.stats.steps)
        assert engine._in_flight is None
    assert steps[0] == steps[1] == 14


def test_abort_while_its_step_computes():
    """The abort's output holds the tokens so far, never the placeholder of the one computing."""
    llm = LLM(async_scheduling=True)
    engine = llm.engine
    engine.add_request("a", [7, 8, 9], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    got = []
    for _ in range(3):
        got += [t for o in engine.step() for t in o.new_token_ids]
    assert engine._in_flight is not None and engine.requests["a"].has_pending_token
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort" and out.token_ids == got and len(got) == 3
    _assert_idle(engine)


def test_a_fused_decode_step_computes_while_the_engine_plans_the_next():
    """``launch`` returns before the C step is done; ``wait`` gives its logits and greedy tokens, the same as one
    call of the step with its pending ids filled in."""
    llm = LLM(async_scheduling=True)
    engine = llm.engine
    engine.add_request("a", [7, 8, 9], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.step()
    launched = engine._in_flight
    assert launched is not None and type(launched.pending).__name__ == "LaunchedDecode"
    logits, seconds = launched.wait()
    assert seconds > 0
    step = launched.step
    ids = step.inputs.input_ids_T.clone()
    assert (ids < 0).all()  # the C step took them from the previous step's tokens
    fill_pending(ids, launched.pending.tokens_S)
    group = step.inputs.attention.decodes[0]
    again = engine.runner.fused(ids, step.inputs.positions_T, step.inputs.attention.slot_mapping_T,
                                group.tables_BM, group.lens_B, step.inputs.last_rows)  # rewrites the same K/V slots
    assert torch.equal(logits, again)
    assert launched.pending.greedy_S.tolist() == again.argmax(dim=-1).tolist()


def test_fill_pending_takes_each_rows_token():
    import numpy as np

    ids = torch.tensor([5, pending_token(2), 9, pending_token(0)])
    fill_pending(ids, np.array([11, 12, 13]))
    assert ids.tolist() == [5, 13, 9, 11]


@pytest.mark.parametrize("value", ["yes", 1])
def test_async_scheduling_must_be_a_bool(value):
    with pytest.raises(ValueError, match=rf"async_scheduling \({value!r}\)"):
        LLM(async_scheduling=value)
