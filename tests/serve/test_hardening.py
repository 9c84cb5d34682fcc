"""Issue 19, the HTTP side, in process (Starlette's TestClient over one engine): fan-out limits, lone surrogates,
strict types, refused-not-ignored fields, penalties and logit_bias end to end, API keys (the official client too),
truthful endings on drain, and the small things (routing model name, system_fingerprint, tokenizer-less
checkpoints, prompts refused by their length before tokenising, tokenising without holding the GIL)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import contextmanager

import openai
import pytest
from starlette.testclient import TestClient

from serve import LLMEngine
from serve.engine.config import EngineConfig
from serve.http.app import OpenAIServer
from serve.http.config import ServerConfig

MODEL = "moe-serve-default"
PROMPT = "def fibonacci(n):"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                                  max_queued_requests=8))


@contextmanager
def serving(engine, **config):
    api = OpenAIServer(engine, ServerConfig(**config))
    with TestClient(api.app) as client:
        client.api = api
        yield client


@pytest.fixture
def client(engine):  # per test: the tests that build their own server must not share the engine with this one
    with serving(engine) as c:
        yield c


def _raw(client, path: str, body: dict, **headers):
    """json.dumps escapes a lone surrogate as ``\\ud800``, as a client written in JS or Java would send it."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json", **headers})


def _error(r, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert "\n" not in error["message"]
    return error


# -- 1. a request the queue could never hold is a 400, not a 429 ------------------------------------------------
def test_prompts_times_n_over_the_server_limit_is_a_400(client):
    r = client.post("/v1/completions", json={"prompt": [PROMPT] * 32, "n": 128, "max_tokens": 1})
    message = _error(r, 400, "n")["message"]
    assert "prompts (32) x n (128) = 4096" in message and "server.max_sub_requests_per_request (256)" in message


def test_prompts_times_n_over_the_queue_is_a_400_naming_it(client):
    r = client.post("/v1/completions", json={"prompt": [PROMPT] * 3, "n": 3, "max_tokens": 1})
    assert "engine.max_queued_requests (8)" in _error(r, 400, "n")["message"]
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "n": 9, "max_tokens": 1})
    assert "engine.max_queued_requests (8)" in _error(r, 400, "n")["message"]
    assert client.post("/v1/completions", json={"prompt": [PROMPT] * 2, "n": 4, "max_tokens": 1}).status_code == 200


# -- 2. lone surrogates in any string ------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\udfff"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "echo": True, "stop": "\ud83d"}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "\ud800"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "user": "\ud800"}, "user"),
    ("/v1/completions", {"prompt": "x", "model": "\ud800"}, "model"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"\ud800": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "\ud800": 1}, "\\ud800"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "\ud800", "content": "x"}]}, "messages"),
])
def test_lone_surrogates_are_400s_in_openai_schema(client, path, body, param):
    error = _error(_raw(client, path, body), 400, param)
    assert "lone UTF-16 surrogate" in error["message"] and error["type"] == "invalid_request_error"


def test_control_characters_are_text(client):
    r = _raw(client, "/v1/completions", {"prompt": "a\u0000b\u001f\u2028", "max_tokens": 2, "echo": True,
                                        "stop": ["\u0000"], "user": "\u0007"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("a\u0000b\u001f\u2028")


# -- 3. strict validation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "n": "3"}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": [[False]]}, "prompt"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "echo": 1}, "echo"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": 1.0}, "seed"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "hacker", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": 1}, "logprobs"),
])
def test_no_coercion_and_openai_limits(client, path, body, param):
    _error(_raw(client, path, body), 400, param)


@pytest.mark.parametrize("role", ["system", "user", "assistant", "developer"])
def test_every_openai_role_is_accepted(client, role):
    messages = [{"role": role, "content": "x"}] + ([] if role == "user" else CHAT)
    assert client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).status_code == 200


def test_four_stop_strings_are_accepted(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "stop": ["a", "b", "c", "d"], "max_tokens": 4})
    assert r.status_code == 200


# -- 5. fields that would be silently ignored ----------------------------------------------------------------------
@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/completions", {"presence_penalty": "1"}, "presence_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
])
def test_unsupported_or_bad_fields_are_refused(client, path, extra, param):
    body = {"prompt": "x"} if path.endswith("/completions") and "chat" not in path else {"messages": CHAT}
    error = _error(client.post(path, json={**body, **extra}), 400, param)
    if param in ("tools", "tool_choice", "functions"):
        assert "not supported yet" in error["message"]


def test_text_response_format_and_no_tools_are_fine(client):
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "tools": [],
                                                  "tool_choice": "none", "response_format": {"type": "text"}})
    assert r.status_code == 200


def _greedy_ids(client, **extra) -> list[int]:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0, **extra}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    tok = client.api.tokenizer
    ids = {}
    for i in range(tok.vocab_size):
        ids.setdefault(tok.decode([i], skip_special_tokens=False), []).append(i)
    assert all(len(ids[t]) == 1 for t in tokens)  # each text names one token
    return [ids[t][0] for t in tokens]


def test_logit_bias_and_penalties_change_greedy_output(client):
    base = _greedy_ids(client)
    assert _greedy_ids(client, logit_bias={"65": 100}) == [65] * 12
    assert _greedy_ids(client, logit_bias={str(base[0]): -100})[0] != base[0]
    assert len(set(base)) < len(base)  # the default model repeats itself on this prompt
    assert len(set(_greedy_ids(client, presence_penalty=2.0, frequency_penalty=2.0))) > len(set(base))
    assert _greedy_ids(client, repetition_penalty=1.0) == base


# -- 6. API keys ---------------------------------------------------------------------------------------------------
def test_api_key_guards_everything_but_health_and_metrics(engine):
    with serving(engine, api_key="sesame") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/v1/moe/routing"),
                                 ("POST", "/v1/chat/completions")):
                r = c.request(method, path, json={"prompt": "x"}, headers=headers)
                assert _error(r, 401, "Authorization")["type"] == "authentication_error"
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        ok = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                    headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200
        right = openai.OpenAI(base_url="http://testserver/v1", api_key="sesame", http_client=c, max_retries=0)
        assert right.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
        wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=c, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt="x", max_tokens=1)


def test_api_key_from_the_environment(engine, monkeypatch):
    monkeypatch.setenv("MOE_SERVE_API_KEY", "from-env")
    with serving(engine) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    with serving(engine, api_key="cfg") as c:  # the config wins over the environment
        assert c.get("/v1/models", headers={"Authorization": "Bearer cfg"}).status_code == 200


# -- 7. truthful endings on drain ----------------------------------------------------------------------------------
def _slow_steps(engine, monkeypatch, delay: float = 0.02) -> None:
    real = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(delay), real())[1])


def test_drain_ends_non_streaming_with_503_and_health_503(engine, monkeypatch):
    _slow_steps(engine, monkeypatch)
    with serving(engine, drain_timeout_s=0.3) as c:
        result = {}
        body = {"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "n": 2}
        worker = threading.Thread(target=lambda: result.setdefault("r", c.post("/v1/completions", json=body)))
        worker.start()
        while not c.api.loop.busy():
            time.sleep(0.01)
        drain = threading.Thread(target=asyncio.run, args=(c.api.drain(),))
        drain.start()
        time.sleep(0.1)
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["reason"] == "draining"
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 503
        drain.join(5)
        worker.join(10)
        error = _error(result["r"], 503, None)
        assert "drain_timeout_s (0.3 s)" in error["message"] and error["type"] == "service_unavailable"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_drain_ends_a_stream_with_an_error_event_then_done(engine, monkeypatch):
    _slow_steps(engine, monkeypatch)
    with serving(engine, drain_timeout_s=0.2) as c:
        body = {"messages": CHAT, "max_tokens": 100, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            frames = [next(line for line in lines if line.startswith("data: "))]
            drain = threading.Thread(target=asyncio.run, args=(c.api.drain(),))
            drain.start()
            frames += [line for line in lines if line.startswith("data: ")]
        drain.join(5)
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[-2][6:])["error"]["code"] == 503
    assert all(json.loads(f[6:]).get("choices", [{}])[0].get("finish_reason") != "abort" for f in frames[:-1])


def test_a_drain_with_nothing_running_returns_at_once(engine):
    api = OpenAIServer(engine, ServerConfig(drain_timeout_s=30))
    start = time.monotonic()
    asyncio.run(api.drain())
    assert time.monotonic() - start < 1 and api.draining


# -- 8. small things -----------------------------------------------------------------------------------------------
def test_routing_names_the_served_model_and_chat_has_a_fingerprint(engine):
    from routing.stats import RoutingStats

    stats = RoutingStats.attach(engine.model, window=4)
    try:
        api = OpenAIServer(engine, ServerConfig(served_model_name="mine"), stats)
        with TestClient(api.app) as c:
            assert c.get("/v1/moe/routing").json()["model"] == "mine"
            chat = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}).json()
            assert chat["system_fingerprint"].startswith("fp_")
            r = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "stream": True})
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            assert {chunk["system_fingerprint"] for chunk in chunks} == {chat["system_fingerprint"]}
    finally:
        stats.detach()


def test_a_checkpoint_without_tokenizer_warns_and_returns_token_ids(tmp_path, caplog):
    from tests.serve.checkpoints import hf_model, save

    path = save(hf_model("mixtral"), tmp_path / "ckpt")
    bare = LLMEngine(EngineConfig(model=path, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=64))
    with caplog.at_level(logging.WARNING, logger="moe-serve"):
        api = OpenAIServer(bare, ServerConfig())
    assert "has no tokenizer" in caplog.text and "token_ids" in caplog.text
    with TestClient(api.app) as c:
        r = c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}).json()
        assert r["choices"][0]["text"] == "" and len(r["choices"][0]["token_ids"]) == 4
        r = c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True, "stream": True})
        ids = [i for line in r.iter_lines() if line.startswith("data: {")
               for i in json.loads(line[6:])["choices"][0]["token_ids"]]
        assert len(ids) == 3


# -- 9. huge prompts -----------------------------------------------------------------------------------------------
def test_a_prompt_too_long_by_its_length_is_refused_before_tokenising(client, monkeypatch):
    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised a prompt that its length already rules out")

    chars = 128 * client.api.tokenizer.max_token_chars
    monkeypatch.setattr(client.api.tokenizer, "encode", no_tokenising)
    monkeypatch.setattr(client.api.tokenizer, "encode_chat", no_tokenising)
    start = time.monotonic()
    message = _error(client.post("/v1/completions", json={"prompt": "x" * chars}), 400, "prompt")["message"]
    assert f"{chars} characters" in message and "max_model_len" in message
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * chars}]})
    _error(r, 400, "messages")
    assert time.monotonic() - start < 2


def test_tokenising_a_long_text_does_not_hold_the_gil(client):
    text = "def f(x):\n    return x\n" * 40_000  # ~1 MB: about a second of tokenising
    gaps, done = [], threading.Event()
    worker = threading.Thread(target=lambda: (client.api.tokenizer.encode(text), done.set()))
    start = last = time.perf_counter()
    worker.start()
    while not done.is_set():
        time.sleep(0.005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join()
    assert time.perf_counter() - start > 0.3, "too fast to tell"
    assert max(gaps) < 0.2, f"this thread waited {max(gaps):.2f} s for the GIL"
