"""The engine on the embedded default model: input validation, stops, seeds, logprobs, aborts, preemption."""

from __future__ import annotations

import pytest
import torch

from serve import LLM, SamplingParams
from serve.engine.sequence import SequenceStatus

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=512)


def _assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.requests and len(engine.scheduler) == 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)


@pytest.mark.parametrize("prompt, params, message", [
    ("", None, r"prompt \(''\) is empty"),
    ([], None, r"prompt \(\[\]\) is empty"),
    ([5] * 600, None, r"prompt length \(600\) must be < max_model_len \(512\)"),
    ("x", dict(max_tokens=0), r"max_tokens \(0\)"),
    ("x", dict(temperature=-1.0), r"temperature \(-1\.0\)"),
    ("x", dict(top_p=0.0), r"top_p \(0\.0\)"),
    ("x", dict(top_p=1.5), r"top_p \(1\.5\)"),
])
def test_bad_input_raises_and_engine_keeps_serving(llm, prompt, params, message):
    engine = llm.engine
    engine.add_request("good", "def add(a, b):", GREEDY)
    sampling = SamplingParams()
    for name, value in (params or {}).items():
        setattr(sampling, name, value)  # bypass construction: the engine validates on admission too
        with pytest.raises(ValueError, match=message):
            SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, sampling)
    assert "bad" not in engine.requests
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].request_id == "good" and outputs[-1].finished and len(outputs[-1].token_ids) == 24
    _assert_idle(llm)


def test_bad_prompt_in_a_batch_adds_nothing(llm):
    with pytest.raises(ValueError, match="is empty"):
        llm.generate(["import os", ""], GREEDY)
    _assert_idle(llm)
    assert llm.generate("import os", GREEDY)[0].token_ids


def test_same_seed_same_text_alone_or_batched(llm):
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = llm.generate("class ", seeded)[0]
    batched = llm.generate(["import re\n", "class ", "for i in range("],
                           [SamplingParams(max_tokens=30, temperature=0.8), seeded, GREEDY])[1]
    other = llm.generate("class ", SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=99))[0]
    assert alone.text == batched.text and alone.token_ids == batched.token_ids
    assert other.token_ids != alone.token_ids
    _assert_idle(llm)


def test_stop_strings_stop_tokens_and_length(llm):
    full = llm.generate("def __init__(self", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    stop = full.text[10:14]
    cut = llm.generate("def __init__(self", SamplingParams(max_tokens=40, temperature=0.0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)]
    kept = llm.generate("def __init__(self", SamplingParams(max_tokens=40, temperature=0.0, stop=stop,
                                                           include_stop_str_in_output=True))[0]
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]
    token = full.token_ids[5]
    by_id = llm.generate("def __init__(self", SamplingParams(max_tokens=40, temperature=0.0,
                                                            stop_token_ids=[token]))[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(token) + 1] and by_id.stop_reason == token


def test_logprobs(llm):
    out = llm.generate("import ", SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))[0]
    assert len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert list(entry)[0] == token and len(entry) == 3
        assert entry[token] == max(entry.values()) and all(v <= 0 for v in entry.values())


def test_aborts_and_preemption_return_every_block():
    llm = LLM(num_kv_blocks=24, block_size=16, max_num_seqs=6, max_num_batched_tokens=96, max_model_len=256)
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    text = "def main(argv=None):\n    parser = argparse.ArgumentParser()\n    return parser.parse_args(argv)\n"
    base = llm.tokenizer.encode(text * 4)
    for i in range(12):
        n = int(torch.randint(8, 120, (1,), generator=g))
        max_tokens = int(torch.randint(8, 100, (1,), generator=g))
        engine.add_request(str(i), base[i:i + n],
                           SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i, ignore_eos=True))
    finished, step = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
        if step == 2:  # one mid-prefill or decoding, one still waiting
            running = [s.request_id for s in engine.scheduler.running]
            waiting = [s.request_id for s in engine.scheduler.waiting]
            assert running and waiting
            assert engine.abort(running[-1]).finish_reason == "abort"
            assert engine.abort(waiting[-1]).finish_reason == "abort"
        if step == 20:
            victim = next(s for s in engine.scheduler.running if s.status is SequenceStatus.RUNNING)
            assert engine.abort(victim.request_id).finished
    assert engine.scheduler.num_preemptions > 0
    assert len(finished) == 9
    assert all(o.finish_reason == "length" for o in finished.values())
    _assert_idle(llm)


def test_prefix_source_computes_a_shared_prompt_once(llm):
    engine = llm.engine
    prompt = list(range(40, 140))  # 100 tokens: 6 full blocks of 16 + 4, not seen by this engine before
    params = SamplingParams(max_tokens=8, temperature=0.0)
    before = engine.stats.prompt_tokens
    engine.add_request("first", prompt, params)
    engine.add_request("second", prompt, params, prefix_source="first")
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.stats.prompt_tokens - before == 100 + 4  # the sibling recomputed only the partial last block
    assert finals["second"].num_cached_tokens == 96
    _assert_idle(llm)
    alone = llm.generate(prompt, params)[0]
    assert finals["first"].token_ids == finals["second"].token_ids == alone.token_ids
    with pytest.raises(ValueError, match=r"prefix_source \('nope'\)"):
        engine.add_request("third", prompt, params, prefix_source="nope")
    assert not engine.requests
