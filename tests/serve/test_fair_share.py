"""Fair shares of the batch between clients (``serve.engine.fair_share``): the module's worked example, first come
first served without clients, a small client seated at once next to one holding the whole batch, no preemption
between equals, and greedy outputs unchanged by the preemptions fairness makes (the real default model)."""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import pytest

from serve import LLM, SamplingParams
from serve.engine import fair_share
from serve.engine.sampling_params import SamplingParams as Params
from serve.engine.scheduler import Scheduler
from serve.engine.sequence import Sequence, SequenceStatus
from tests.serve.test_scheduler import _make as make_scheduler
from tests.serve.test_scheduler import _step  # one step with a fake model


def _make(max_num_seqs: int, num_blocks: int = 256, block_size: int = 4, budget: int = 64) -> Scheduler:
    return make_scheduler(num_blocks, block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


ARRIVALS = itertools.count()


def _add(sched: Scheduler, name: str, client: str | None, prompt_len: int = 5, max_tokens: int = 4) -> Sequence:
    arrival = next(ARRIVALS)  # prompts differ: no prefix-cache hits
    seq = Sequence(name, list(range(10 * arrival, 10 * arrival + prompt_len)), Params(max_tokens=max_tokens),
                   arrival, client=client)
    sched.add(seq)
    return seq


def _names(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def test_the_worked_example():
    sched = _make(max_num_seqs=3)
    a = [_add(sched, f"a{i}", "a", max_tokens=50) for i in range(5)]
    _step(sched)
    assert _names(sched.running) == ["a0", "a1", "a2"]
    b0, c0 = _add(sched, "b0", "b"), _add(sched, "c0", "c")
    never = lambda s: False  # noqa: E731
    assert _names(fair_share.victims(sched.waiting, sched.running, 3, never)) == ["a2", "a1"]
    out = sched.schedule()
    assert _names(out.preempted) == ["a2", "a1"] and _names(sched.waiting) == ["a1", "a2", "a3", "a4"]
    assert _names(sched.running) == ["a0", "b0", "c0"]
    assert b0 in out.seqs and c0 in out.seqs and a[0] in out.seqs
    assert _names(fair_share.admission_order(sched.waiting, sched.running)) == ["a1", "a2", "a3", "a4"]


def test_admission_order_round_robin_fewest_running_first():
    sched = _make(max_num_seqs=8)
    seqs = [_add(sched, name, name[0]) for name in ("a0", "a1", "a2", "b0", "b1", "c0")]
    order = _names(fair_share.admission_order(seqs, []))
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert _names(fair_share.admission_order(seqs[1:], seqs[:1])) == ["b0", "c0", "a1", "b1", "a2"]


def test_without_clients_the_queue_is_first_come_first_served():
    sched = _make(max_num_seqs=2)
    seqs = [_add(sched, f"s{i}", None) for i in range(6)]
    assert list(fair_share.admission_order(seqs, [])) == seqs
    _step(sched)
    assert fair_share.victims(sched.waiting, sched.running, 2, lambda s: False) == []
    out = sched.schedule()
    assert not out.preempted and _names(sched.running) == ["s0", "s1"]


def test_a_small_client_is_seated_at_once_next_to_one_holding_the_batch():
    sched = _make(max_num_seqs=8)
    big = [_add(sched, f"a{i}", "big", max_tokens=40) for i in range(32)]
    for _ in range(3):
        _step(sched)
    assert len(sched.running) == 8 and all(s.client == "big" for s in sched.running)
    small = [_add(sched, f"b{i}", f"small{i}", max_tokens=2) for i in range(3)]
    out = _step(sched)
    assert all(s in out.seqs for s in small) and len(out.preempted) == 3  # seated in the step they arrived
    assert {s.client for s in out.preempted} == {"big"} and len(sched.running) == 8
    steps = 1
    while not all(s.is_finished for s in small):
        _step(sched)
        steps += 1
    assert steps <= 3
    while len(sched):
        _step(sched)
    assert all(s.num_output_tokens == 40 for s in big) and all(s.status is SequenceStatus.FINISHED for s in big)
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


def test_clients_with_equal_shares_do_not_preempt_each_other():
    sched = _make(max_num_seqs=4)
    for name in ("a0", "a1", "b0", "b1", "a2", "b2"):
        _add(sched, name, name[0], max_tokens=20)
    _step(sched)
    assert sorted(s.client for s in sched.running) == ["a", "a", "b", "b"]
    for _ in range(5):
        assert not _step(sched).preempted


def test_fair_preemption_keeps_greedy_outputs():
    llm = LLM(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    engine, greedy = llm.engine, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(", "# sort a list\n", "x = [1, 2"]
    alone = [out.token_ids for out in llm.generate(prompts, greedy)]
    for i, prompt in enumerate(prompts[:5]):
        engine.add_request(f"big-{i}", prompt, greedy, client="big")
    for _ in range(3):
        engine.step()
    engine.add_request("small", prompts[5], greedy, client="small")
    final, preempted = {}, 0
    while engine.has_unfinished_requests():
        steps = engine.scheduler.num_preemptions
        final.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
        preempted += engine.scheduler.num_preemptions - steps
    assert preempted >= 1
    assert [final[f"big-{i}"] for i in range(5)] + [final["small"]] == alone
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.slow
def test_end_to_end_small_requests_finish_long_before_a_large_one():
    """The real server, a batch of 4: one request of 2 prompts x n=16 (32 sub-requests) then 4 small ones; first
    come, first served, each small one would wait for 28 of the large one's sub-requests to finish."""
    from benchmarks.server import running_server

    big = {"prompt": [[5, 6, 7, 8], [9, 10, 11, 12]], "n": 16, "max_tokens": 100, "ignore_eos": True, "seed": 3}
    small = {"prompt": [13, 14, 15], "max_tokens": 2, "ignore_eos": True}

    async def run(url: str) -> tuple[float, list[float]]:
        async with httpx.AsyncClient(timeout=300) as client:
            start = time.perf_counter()
            large = asyncio.create_task(client.post(url, json=big))
            await asyncio.sleep(0.5)

            async def one() -> float:
                r = await client.post(url, json=small)
                assert r.status_code == 200, r.text
                return time.perf_counter() - start

            smalls = await asyncio.gather(*[one() for _ in range(4)])
            assert (await large).status_code == 200
            return time.perf_counter() - start, smalls

    with running_server("engine.max_num_seqs=4", "engine.max_num_batched_tokens=64") as server:
        large_s, small_s = asyncio.run(run(server.v1 + "/completions"))
        preemptions = server.metric("vllm:num_preemptions_total")
        server.wait_idle()
    assert max(small_s) < 0.3 * large_s, (small_s, large_s)
    assert preemptions >= 1  # seats made for the small ones
