"""The server under a burst of streaming clients (a fifth of them leave mid-stream), hostile bodies and fuzzed
requests: never a 5xx, every accepted request completes or is cleanly aborted, and afterwards every KV block
is free and ``/health`` is 200."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.server import running_server

OVERRIDES = ("model.max_model_len=64", "engine.max_num_seqs=4", "engine.max_num_batched_tokens=64",
             "engine.max_queued_requests=32", "server.max_request_bytes=2000000")


@pytest.fixture(scope="module")
def server():
    with running_server(*OVERRIDES) as s:
        yield s


async def _stream_client(client: httpx.AsyncClient, url: str, leave_after: int | None) -> str:
    body = {"prompt": "import numpy as np\n", "max_tokens": 40, "ignore_eos": True, "stream": True,
            "temperature": 0.7, "seed": 5}
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            assert r.status_code == 429 and r.headers.get("retry-after"), (r.status_code, r.text)
            return "refused"
        frames = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "done"
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            frames += 1
            if leave_after is not None and frames >= leave_after:
                return "left"  # closing the response drops the connection mid-stream
    raise AssertionError("stream ended without [DONE]")


def test_burst_with_disconnects_leaves_nothing_behind(server):
    aborted_before = server.metric("vllm:request_success_total", 'finished_reason="abort"')

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            jobs = [_stream_client(client, server.v1 + "/completions", 2 if i % 5 == 0 else None) for i in range(20)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(burst())
    assert results.count("left") == 4
    assert results.count("done") == 16
    server.wait_idle()
    assert server.metric("vllm:request_success_total", 'finished_reason="abort"') - aborted_before == 4
    assert httpx.get(server.url + "/health").status_code == 200


HOSTILE = [
    b"{not json", b"", b"[]", b"null", b'"a string"', b"\xff\xfe\x00garbage", b"[" * 100_000 + b"]" * 100_000,
    json.dumps({"prompt": "x", "max_tokens": 10**30}).encode(),
    json.dumps({"prompt": "x", "max_tokens": -5}).encode(),
    json.dumps({"prompt": "x", "temperature": "hot"}).encode(),
    json.dumps({"prompt": {"nested": [1, 2]}}).encode(),
    json.dumps({"prompt": [1, "two", 3.5]}).encode(),
    json.dumps({"prompt": "x", "n": 10**6}).encode(),
    json.dumps({"prompt": "x", "stop": 17}).encode(),
    json.dumps({"prompt": "x", "top_k": 1.5}).encode(),
    b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "x", "top_p": Infinity}',
    json.dumps({"prompt": "x" * 1_000_000}).encode(),  # 1 MB prompt: too long for the context
    json.dumps({"prompt": "x" * 3_000_000}).encode(),  # over server.max_request_bytes: 413
]
HOSTILE_CHAT = [
    json.dumps({"messages": []}).encode(),
    json.dumps({"messages": "hello"}).encode(),
    json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}).encode(),
    json.dumps({"messages": [{"content": "no role"}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}).encode(),
]


@pytest.mark.parametrize("path, body", [("/completions", b) for b in HOSTILE] + [("/chat/completions", b)
                                                                                for b in HOSTILE_CHAT])
def test_hostile_bodies_get_4xx_in_openai_schema(server, path, body):
    r = httpx.post(server.v1 + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_queue_full_is_429_with_retry_after():
    async def flood(url):
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"prompt": "def f(x):", "max_tokens": 30, "ignore_eos": True}
            return await asyncio.gather(*[client.post(url, json=body) for _ in range(8)])

    with running_server("engine.max_num_seqs=1", "engine.max_num_batched_tokens=64",
                        "engine.max_queued_requests=1", "server.routing_stats=false") as s:
        responses = asyncio.run(flood(s.v1 + "/completions"))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        refused = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == 429 for r in refused)
        s.wait_idle()


def _post(url: str, body: dict) -> httpx.Response:
    # json.dumps writes NaN/Infinity literals (httpx's json= refuses them); the server must cope with them
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=120)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
SMALL = st.integers(-3, 40)
# lone surrogates (sent as \\udXXX escapes: json.dumps writes them so), control characters, separators, astral
ODD = st.sampled_from(["\ud800", "\udfff", "\udc00x", "\x00", "\x1b[2J", "\u2028", "\ufeff", "\U0001f600", "\r\n"])
HOSTILE_TEXT = st.lists(ODD | st.text(max_size=4), max_size=5).map("".join)
FIELDS = {
    "model": st.sampled_from(["moe-serve-default", "other"]) | JSON_VALUES | HOSTILE_TEXT,
    "max_tokens": SMALL | JSON_VALUES, "temperature": st.floats(-1, 3) | JSON_VALUES,
    "top_p": st.floats(-0.5, 1.5) | JSON_VALUES, "top_k": SMALL | JSON_VALUES, "min_p": st.floats(-1, 2),
    "n": st.integers(-1, 3) | JSON_VALUES, "stop": st.lists(HOSTILE_TEXT, max_size=5) | HOSTILE_TEXT | JSON_VALUES,
    "seed": st.integers(-(2**64), 2**64) | JSON_VALUES, "logprobs": st.integers(-1, 25) | JSON_VALUES,
    "stream": st.booleans() | JSON_VALUES, "echo": st.booleans(), "ignore_eos": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON_VALUES,
    "whatever": JSON_VALUES, "user": HOSTILE_TEXT | JSON_VALUES,
    "frequency_penalty": st.floats(-3, 3) | JSON_VALUES, "presence_penalty": st.floats(-3, 3) | JSON_VALUES,
    "repetition_penalty": st.floats(-1, 3) | JSON_VALUES,
    "logit_bias": st.dictionaries(HOSTILE_TEXT | st.integers(-2, 5000).map(str), st.floats(-300, 300) | JSON_VALUES,
                                  max_size=3) | JSON_VALUES,
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"]) | HOSTILE_TEXT})
    | JSON_VALUES,
}
PROMPTS = (st.text(max_size=30) | HOSTILE_TEXT | st.lists(HOSTILE_TEXT, max_size=3)
           | st.lists(st.integers(-5, 5000), max_size=6) | JSON_VALUES)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=PROMPTS, extra=st.fixed_dictionaries({}, optional=FIELDS))
def test_fuzzed_completion_bodies_never_5xx(server, prompt, extra):
    r = _post(server.v1 + "/completions", {"prompt": prompt, **extra})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    elif r.status_code == 200:
        assert r.json()["choices"]
    else:
        assert r.json()["error"]["message"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.fixed_dictionaries({
           "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "hacker", ""]) | JSON_VALUES
           | HOSTILE_TEXT,
           "content": st.text(max_size=20) | HOSTILE_TEXT | JSON_VALUES
           | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": HOSTILE_TEXT}), max_size=2)}),
           max_size=3),
       extra=st.fixed_dictionaries({}, optional={**FIELDS, "logprobs": st.booleans() | JSON_VALUES,
                                                 "top_logprobs": st.integers(-1, 25) | JSON_VALUES,
                                                 "max_completion_tokens": SMALL | JSON_VALUES,
                                                 "tools": st.lists(JSON_VALUES, max_size=2) | JSON_VALUES,
                                                 "tool_choice": st.sampled_from(["none", "auto"]) | JSON_VALUES}))
def test_fuzzed_chat_bodies_never_5xx(server, messages, extra):
    r = _post(server.v1 + "/chat/completions", {"messages": messages, **extra})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_idle_and_healthy_after_the_fuzzing(server):
    server.wait_idle()
    assert httpx.get(server.url + "/health").status_code == 200
