"""The engine core in a process of its own (``serve.engine.core_process``, ``server.engine_process=true``, the
default of ``moe-serve``): same outputs as the engine in-process, blocks back after aborts, build errors raised
in the serving process, a failing or killed core reported (``/health`` 503, the stream's error event), and no core
left behind when the server stops or dies."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.server import running_server
from serve import LLM, EngineConfig, LLMEngine, SamplingParams
from serve.engine.core_process import CoreSetup, EngineCoreClient, EngineCoreError
from serve.http.core_loop import CoreEngineLoop
from serve.http.engine_loop import SubRequest

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


# -- builders run in the core process (module level: they are pickled by reference) --------------------------------
def build_default() -> CoreSetup:
    return CoreSetup(LLMEngine(EngineConfig(num_kv_blocks=128, max_model_len=512)), summary="default model")


def build_failing_after(steps: int) -> CoreSetup:
    engine = LLMEngine(EngineConfig(num_kv_blocks=128, max_model_len=512))
    real = engine.step

    def step():
        if engine.stats.steps >= steps:
            raise RuntimeError("injected step failure")
        return real()

    engine.step = step  # type: ignore[method-assign]
    return CoreSetup(engine)


def build_hanging_after(steps: int) -> CoreSetup:
    engine = LLMEngine(EngineConfig(num_kv_blocks=128, max_model_len=512))
    real = engine.step

    def step():
        if engine.stats.steps >= steps:
            time.sleep(3.0)  # a stuck step (a hung kernel, a deadlock)
        return real()

    engine.step = step  # type: ignore[method-assign]
    return CoreSetup(engine)


def build_missing_model() -> CoreSetup:
    return CoreSetup(LLMEngine(EngineConfig(model="/nonexistent/checkpoint")))


class Collector:
    """``on_step`` / ``on_death`` for a client: finished outputs by id, the last counters, the death."""

    def __init__(self) -> None:
        self.finished: dict = {}
        self.counters = None
        self.death: BaseException | None = None
        self.event = threading.Event()

    def on_step(self, outputs, counters) -> None:
        self.counters = counters
        for out in outputs:
            if out.finished:
                self.finished[out.request_id] = out
        self.event.set()

    def on_death(self, error) -> None:
        self.death = error
        self.event.set()

    def wait(self, done, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out"
            self.event.wait(0.05)
            self.event.clear()


@pytest.fixture(scope="module")
def core():
    client = EngineCoreClient(build_default)
    seen = Collector()
    client.start(seen.on_step, seen.on_death)
    yield client, seen
    client.shutdown()
    assert not client.process.is_alive()


def test_core_outputs_equal_the_engine_in_this_process(core):
    client, seen = core
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9] * 10, [5] * 40]
    params = [GREEDY, SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)]
    requests = [(f"eq-{i}", p, sp, None, None) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    client.add("c", requests).result(30)
    seen.wait(lambda: all(f"eq-{i}" in seen.finished for i in range(3)))
    reference = LLM(num_kv_blocks=128, max_model_len=512).generate(prompts, params)
    for i, ref in enumerate(reference):
        got = seen.finished[f"eq-{i}"]
        assert got.token_ids == ref.token_ids
        assert got.prompt_token_ids == prompts[i]
        assert got.finish_reason == ref.finish_reason == "length"
    assert seen.finished["eq-1"].logprobs == reference[1].logprobs


def test_admission_errors_reach_the_caller_and_admit_nothing(core):
    client, seen = core
    with pytest.raises(ValueError, match="must be < max_model_len"):
        client.add(None, [("ok-0", [1, 2], GREEDY, None, None), ("too-long", [1] * 600, GREEDY, None, None)]
                   ).result(30)
    client.add(None, [("ok-0", [3, 4], GREEDY, None, None)]).result(30)  # the id was not left taken
    with pytest.raises(ValueError, match="already in use"):
        client.add(None, [("ok-0", [5], GREEDY, None, None)])
    seen.wait(lambda: "ok-0" in seen.finished)
    assert seen.finished["ok-0"].prompt_token_ids == [3, 4]


def test_abort_returns_every_block(core):
    client, seen = core
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    client.add("a", [(f"ab-{i}", [9] * 30, long, None, None) for i in range(3)]).result(30)
    seen.wait(lambda: seen.counters is not None and seen.counters.running == 3)
    client.abort([f"ab-{i}" for i in range(3)])
    seen.wait(lambda: all(f"ab-{i}" in seen.finished for i in range(3)))
    assert {seen.finished[f"ab-{i}"].finish_reason for i in range(3)} == {"abort"}
    c = seen.counters
    assert (c.running, c.waiting, c.free_blocks) == (0, 0, c.num_blocks)


def test_build_error_is_raised_in_the_serving_process():
    with pytest.raises(Exception, match="nonexistent"):
        EngineCoreClient(build_missing_model)


def test_failing_step_is_reported_and_fails_what_waits():
    client = EngineCoreClient(functools.partial(build_failing_after, 2))
    seen = Collector()
    client.start(seen.on_step, seen.on_death)
    try:
        client.add(None, [("f-0", [1, 2, 3], GREEDY, None, None)]).result(30)
        seen.wait(lambda: seen.death is not None)
        assert isinstance(seen.death, EngineCoreError) and "injected step failure" in str(seen.death)
        assert not client.alive()
        with pytest.raises(EngineCoreError, match="not running"):
            client.add(None, [("f-1", [1], GREEDY, None, None)]).result(5)
    finally:
        client.shutdown()
    assert not client.process.is_alive()


def test_health_reports_a_silent_core_but_not_an_idle_one():
    """An idle core says nothing for longer than ``stall_s`` and is healthy; a core stuck in a step longer than
    ``stall_s`` with requests in flight is not."""
    client = EngineCoreClient(functools.partial(build_hanging_after, 3))
    loop = CoreEngineLoop(client, stall_s=0.5)

    async def scenario():
        loop.start()
        await asyncio.sleep(1.0)  # idle, silent
        group = await loop.submit([SubRequest("h-0", [1, 2, 3], GREEDY)])
        first = loop.health()
        await asyncio.sleep(1.5)  # the fourth step hangs for 3 s
        stuck = loop.health()
        loop.abort(group)
        return first, stuck

    try:
        first, stuck = asyncio.run(scenario())
    finally:
        loop.shutdown()
    assert first == (True, "ok")
    assert not stuck[0] and "silent" in stuck[1], stuck
    assert not client.process.is_alive()


# -- through moe-serve ----------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _core_of(pid: int) -> int:
    """The engine core among the server's children (the other is multiprocessing's resource tracker)."""
    cores = [c for c in _children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(cores) == 1, cores
    return cores[0]


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        if state == "Z":  # exited, not yet reaped by its parent
            return True
        time.sleep(0.1)
    return False


def _stream(server, body: dict) -> list[dict]:
    frames = []
    with httpx.stream("POST", server.v1 + "/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                frames.append(json.loads(line[6:]))
    return frames


def test_server_outputs_equal_the_in_process_server():
    body = {"prompt": "def fib(n):", "max_tokens": 24, "temperature": 0, "n": 2, "logprobs": 2,
            "stop": ["\n\n"]}
    results = []
    for overrides in (("server.engine_process=true",), ("server.engine_process=false",)):
        with running_server("model.max_model_len=512", *overrides) as s:
            unary = httpx.post(s.v1 + "/completions", json=body, timeout=60).json()
            streamed = "".join(f["choices"][0]["text"] for f in _stream(s, {**body, "n": 1}) if f["choices"])
            results.append(([c["text"] for c in unary["choices"]], [c["logprobs"] for c in unary["choices"]],
                            streamed))
            s.wait_idle()
    assert results[0] == results[1]


def test_engine_core_is_a_child_that_stops_with_the_server():
    with running_server("server.routing_stats=true", "model.max_model_len=512") as s:
        _core_of(s.process.pid)  # exactly one
        routing = httpx.get(s.v1 + "/moe/routing", timeout=30)
        assert routing.status_code == 200 and routing.json()["num_layers"] > 0
        children = _children(s.process.pid)
        s.process.send_signal(signal.SIGTERM)
        assert s.process.wait(60) == 0
    assert all(_gone(pid) for pid in children)


def test_killed_server_leaves_no_core():
    with running_server("model.max_model_len=512") as s:
        core_pid = _core_of(s.process.pid)
        s.process.kill()
        s.process.wait(30)
        assert _gone(core_pid), "the engine core outlived its server"


def test_killed_core_fails_streams_and_health():
    with running_server("model.max_model_len=2048") as s:
        core_pid = _core_of(s.process.pid)
        body = {"prompt": "x", "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", s.v1 + "/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 3:
                    os.kill(core_pid, signal.SIGKILL)
        frames = [line for line in lines if line.startswith("data: ")]
        assert frames[-1] == "data: [DONE]" and "engine core" in json.loads(frames[-2][6:])["error"]["message"]
        health = httpx.get(s.url + "/health", timeout=5)
        assert health.status_code == 503 and "engine core" in health.json()["reason"]
        assert httpx.post(s.v1 + "/completions", json={"prompt": "x"}, timeout=10).status_code == 503
