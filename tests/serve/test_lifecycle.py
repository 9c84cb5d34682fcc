"""Cancellation (a client that leaves frees its KV blocks within a step or so), SIGTERM drain (exit 0, streams
end cleanly), and the engine loop's failure modes (a step that raises -> error frame, /health 503; a step that
hangs -> /health 503)."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from starlette.testclient import TestClient

from benchmarks.server import running_server
from serve import LLMEngine
from serve.engine.config import EngineConfig
from serve.http.app import OpenAIServer
from serve.http.config import ServerConfig

LONG = {"prompt": "class Parser:\n", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with running_server("server.routing_stats=false", "model.max_model_len=2048") as s:
        yield s


def _aborted(server) -> float:
    return server.metric("vllm:request_success_total", 'finished_reason="abort"')


def _wait_aborted(server, before: float, count: int, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while _aborted(server) < before + count:
        assert time.monotonic() - start < timeout, f"not aborted within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize("n", [1, 2])
def test_stream_disconnect_aborts_every_choice(server, n):
    before = _aborted(server)
    with httpx.stream("POST", server.v1 + "/completions", json={**LONG, "n": n, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    generated = server.metric("vllm:generation_tokens_total")
    _wait_aborted(server, before, n)
    server.wait_idle()
    assert server.metric("vllm:generation_tokens_total") - generated < n * 100  # stopped long before 200


def test_non_streaming_disconnect_aborts(server):
    before = _aborted(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", json={**LONG, "n": 2}, timeout=0.5)
    _wait_aborted(server, before, 2)
    server.wait_idle()
    assert httpx.get(server.url + "/health").status_code == 200


def test_sigterm_drains_streams_and_exits_zero():
    """While draining, /health and new requests answer 503; a stream cut by the drain ends with an error event
    and [DONE] (never a 200-looking finish_reason "abort"); the process exits 0."""
    # decodes through torch (engine.attention_backend=torch): ~3 ms a token, so the 2000 outlast the 1.5 s drain on
    # any machine (the fused C step could finish them within it)
    with running_server("server.routing_stats=false", "server.drain_timeout_s=1.5", "model.max_model_len=2048",
                        "engine.attention_backend=torch") as s:
        body = {**LONG, "max_tokens": 2000, "stream": True}
        frames, during = [], []
        with httpx.stream("POST", s.v1 + "/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                frames.append(line)
                if len(frames) == 2:
                    s.process.send_signal(signal.SIGTERM)
                    time.sleep(0.3)
                    during.append(httpx.get(s.url + "/health", timeout=5))
                    during.append(httpx.post(s.v1 + "/completions", json={"prompt": "x"}, timeout=5))
        assert [r.status_code for r in during] == [503, 503], [r.text for r in during]
        assert during[0].json()["reason"] == "draining"
        assert during[1].json()["error"]["type"] == "service_unavailable"
        assert frames[-1] == "data: [DONE]"
        error = json.loads(frames[-2][6:])["error"]
        assert error["code"] == 503 and "drain_timeout_s" in error["message"], error
        assert not any('"abort"' in f for f in frames)
        assert s.process.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=2)


# -- in-process: the engine loop's failure modes -----------------------------------------------------------------
@pytest.fixture
def app_and_engine():
    engine = LLMEngine(EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64))
    api = OpenAIServer(engine, ServerConfig(stall_s=0.5))
    return api, engine


def test_a_step_that_raises_ends_streams_with_an_error_frame_and_health_503(app_and_engine):
    api, engine = app_and_engine
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated device failure")
        return real_step()

    engine.step = failing_step
    with TestClient(api.app) as client:
        r = client.post("/v1/completions", json={**LONG, "max_tokens": 50, "stream": True})
        frames = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert frames[-1] == "data: [DONE]"
        error = json.loads(frames[-2][6:])["error"]
        assert "simulated device failure" in error["message"] and error["code"] == 503
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_hung_step_turns_health_503(app_and_engine):
    api, engine = app_and_engine
    release = threading.Event()
    real_step = engine.step

    def hanging_step():
        release.wait(10)
        return real_step()

    engine.step = hanging_step
    with TestClient(api.app) as client:
        assert client.get("/health").status_code == 200
        worker = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": {"prompt": "x"}})
        worker.start()
        deadline = time.monotonic() + 5
        while client.get("/health").status_code == 200:
            assert time.monotonic() < deadline, "health stayed 200 while a step hung"
            time.sleep(0.1)
        assert "engine step running" in client.get("/health").json()["reason"]
        release.set()
        worker.join(30)
        assert client.get("/health").status_code == 200
