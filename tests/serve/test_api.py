"""The real server driven by the official ``openai`` client: completions and chat, streaming and not, ``n``,
stop strings, usage in streams, logprobs, seeds, echo; answers checked against the offline engine."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from benchmarks.server import running_server
from serve import LLM, SamplingParams

ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256)
OVERRIDES = ("engine.max_num_seqs=8", "engine.max_num_batched_tokens=256", "model.max_model_len=256")
PROMPT = "def fibonacci(n):"
MODEL = "moe-serve-default"


@pytest.fixture(scope="module")
def server():
    with running_server(*OVERRIDES) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline():
    return LLM(**ENGINE)


def _greedy(offline, prompt, max_tokens=24, **kw):
    return offline.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))[0]


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_matches_offline_engine(client, offline):
    ref = _greedy(offline, PROMPT)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_completion_equals_unstreamed_and_reports_usage(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_matches_offline_engine_streaming_and_not(client, offline):
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    prompt_ids = offline.tokenizer.encode_chat(messages)
    ref = _greedy(offline, prompt_ids, max_tokens=20)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(prompt_ids)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_n_choices_are_seeded_distinct_and_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, n=2, seed=1234)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.text for c in again.choices]
    assert texts[0] != texts[1]
    single = client.completions.create(**{**kw, "n": 1})
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once, not per choice
    assert 2 <= first.usage.completion_tokens <= 32
    streamed = list(client.completions.create(**kw, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) == texts[i]


def test_seed_changes_the_sample(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0)
    a = client.completions.create(**kw, seed=1).choices[0].text
    b = client.completions.create(**kw, seed=2).choices[0].text
    assert a != b and a == client.completions.create(**kw, seed=1).choices[0].text


def test_stop_string_cuts_the_text_and_never_leaks_into_a_stream(client, offline):
    ref = _greedy(offline, PROMPT, max_tokens=40).text
    stop = ref[12:16]  # spans token boundaries in general; cut where it first occurs
    assert stop.strip(), ref
    expected = ref[:ref.find(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == expected
    assert all(stop not in "".join(pieces[:i + 1]) for i in range(len(pieces)))


def test_completion_logprobs_match_offline_engine(client, offline):
    ref = _greedy(offline, PROMPT, max_tokens=8, logprobs=3)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for got, want in zip(lp.token_logprobs, ref.logprobs, strict=True):
        assert math.isclose(got, next(iter(want.values())), abs_tol=1e-4)
    assert all(len(top) == 3 and max(top.values()) <= 0 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(math.isclose(max(top.values()), chosen, abs_tol=1e-5)
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_stream_one_entry_per_token(client):
    messages = [{"role": "user", "content": "hello"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 6
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 and e.bytes == list(e.token.encode()) for e in entries)


def test_prompt_forms_token_ids_lists_and_echo(client, offline):
    ids = offline.tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "import os"], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == by_text.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + by_text.choices[0].text


def test_sampling_extras_top_k_min_p_ignore_eos(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.8, seed=3,
                                    extra_body={"top_k": 5, "min_p": 0.05, "ignore_eos": True, "unknown_field": 1})
    assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "x", "n": -3}, 400, "n"),
    ({"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": [10**9]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x", "seed": 2**70}, 400, "seed"),
    ({"max_tokens": 3}, 400, "prompt"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.v1 + "/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] and error["message"]


def test_prompt_longer_than_context_states_both_counts(server, offline):
    long_prompt = "x = 1\n" * 200
    n = len(offline.tokenizer.encode(long_prompt))
    r = httpx.post(server.v1 + "/completions", json={"prompt": long_prompt}, timeout=30)
    assert r.status_code == 400
    assert f"{n} tokens" in r.json()["error"]["message"] and "256" in r.json()["error"]["message"]


def test_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=7)


def test_routing_statistics_count_every_computed_token(server):
    before = httpx.get(server.v1 + "/moe/routing").json()
    assert before["num_layers"] == 4 and before["num_experts"] == 8
    prompt = [1000 + 7 * i for i in range(37)]  # never seen: no prefix-cache hits
    r = httpx.post(server.v1 + "/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                     "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    after = httpx.get(server.v1 + "/moe/routing").json()
    top_k, computed = 2, 37 + 5 - 1  # the last sampled token is never fed back
    for layer in range(4):
        assert sum(after["cumulative"][layer]) - sum(before["cumulative"][layer]) == top_k * computed
    series = server.metric("moe_serve_expert_tokens_total", 'expert="3",layer="2"')
    assert series == after["cumulative"][2][3]


def test_expert_label_buckets_bound_the_series():
    from serve.http.metrics import expert_buckets

    assert expert_buckets(4, 8, 2048) == [(e, e + 1) for e in range(8)]
    wide = expert_buckets(61, 256, 2048)  # DeepSeek-V3-sized: 61 layers x 256 experts
    assert 61 * len(wide) <= 2048 and wide[0] == (0, 8) and wide[-1][1] == 256
    assert expert_buckets(3, 10, 6) == [(0, 5), (5, 10)]


def test_health_metrics_and_idle_after_all_of_the_above(server):
    assert httpx.get(server.url + "/health").status_code == 200
    server.wait_idle()
    assert server.metric("vllm:generation_tokens_total") > 0
    assert server.metric("vllm:time_to_first_token_seconds_count") > 0
    assert server.metric("vllm:request_success_total", 'finished_reason="length"') > 0
