"""``EngineCoreClient``: an ``LLMEngine`` in a process of its own (vLLM V1's engine core), driven over a pipe.

The serving process keeps HTTP, tokenization and detokenization; the core process only admits, schedules, runs
the model and samples. The two do not share a GIL, so neither waits on the other's Python and a second core
works: while the core runs step N's forward pass, the server turns step N-1's tokens into SSE frames.

Messages, pickled over one duplex ``multiprocessing`` pipe, in order:

- to the core: ``("add", call_id, client, [(request_id, prompt_ids, params, prefix_source, arrival)])`` (all or
  none admitted), ``("abort", [request_id])``, ``("call", call_id, name)``, ``("shutdown",)``;
- from the core: ``("ready", CoreInfo)`` or ``("failed", error)`` once, then ``("reply", call_id, error, value)``,
  ``("step", [OutputDelta], EngineCounters)`` after every step and every batch of aborts, ``("died", error)``.

An output crosses as an :class:`OutputDelta` (only what the step added); the client keeps each request's prompt
and tokens and hands its caller whole :class:`RequestOutput` objects, as ``LLMEngine.step`` returns them.
``time.monotonic()`` is one clock for both processes, so request times stay comparable.

The core ignores SIGINT and SIGTERM (a terminal or a supervisor signals the whole group; the serving process
drains, then stops the core) and exits when the pipe closes, so a serving process that dies leaves no core
behind; every request still running when it stops is aborted first, returning its blocks.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count

from serve.engine.config import EngineConfig
from serve.engine.engine import EngineCounters, LLMEngine
from serve.engine.outputs import RequestOutput, RequestTimes
from serve.engine.sampling_params import SamplingParams
from serve.engine.structured import GrammarCompiler
from serve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# (request_id, prompt_ids, params, prefix_source, arrival): one request of an "add" message
CoreRequest = tuple[str, list[int], SamplingParams, str | None, float | None]


@dataclass
class CoreSetup:
    """What the builder returns in the core process: the engine, the start-up line the serving process logs,
    ``calls`` the serving process may make by name (run between steps), ``after_step`` (run after every step)
    and ``close`` (run when the core stops)."""

    engine: LLMEngine
    summary: str = ""
    calls: dict[str, Callable[[], object]] = field(default_factory=dict)
    after_step: Callable[[], None] | None = None
    close: Callable[[], None] | None = None


@dataclass(frozen=True)
class CoreInfo:
    config: EngineConfig
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    summary: str


@dataclass(frozen=True)
class OutputDelta:
    """One request's output of one step, without what the serving process already has."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    text: str
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    times: RequestTimes
    num_preemptions: int


class EngineCoreError(RuntimeError):
    """The engine core process failed: it raised in a step, exited, or stopped answering."""


class EngineCoreClient:
    """Starts the core (``build()`` runs there: it must be picklable, e.g. a module-level function or a
    ``functools.partial`` of one) and waits until its engine is loaded; a build error is raised here.

    Then ``start(on_step, on_death)`` starts the thread that reads the core: ``on_step(outputs, counters)`` for
    every step, ``on_death(error)`` once if the core fails. ``add(client, requests) -> Future`` (resolves to None,
    or raises what ``LLMEngine.add_request`` raised), ``abort(request_ids)``, ``call(name) -> Future``,
    ``shutdown()``. Like an ``LLMEngine`` it has ``config``, ``max_model_len``, ``vocab_size``, ``tokenizer`` and
    ``grammars`` (a compiler of its own here, to check schemas before they are sent)."""

    def __init__(self, build: Callable[[], CoreSetup], log_level: int = logging.INFO) -> None:
        ctx = mp.get_context("spawn")  # not fork: this process may already run threads (and OpenMP's pool)
        self._conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_core_main, args=(child, build, log_level), name="engine-core",
                                   daemon=True)
        self.process.start()
        child.close()
        try:
            info = self._wait_ready()
        except BaseException:  # nothing of a core that never came up stays behind: no process, no pipe
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
            self._conn.close()
            raise
        self.config, self.max_model_len, self.vocab_size = info.config, info.max_model_len, info.vocab_size
        self.summary = info.summary
        self.tokenizer = Tokenizer(info.config.tokenizer) if info.config.tokenizer else None
        self.grammars = GrammarCompiler(self.tokenizer, info.vocab_size, info.eos_token_ids) \
            if self.tokenizer is not None else None
        self.error: BaseException | None = None
        self.last_heard = time.monotonic()
        self._send_lock = threading.Lock()
        self._calls: dict[int, Future] = {}
        self._call_ids = count()
        self._requests: dict[str, _Tracked] = {}  # request_id -> what its outputs are rebuilt from
        self._reader: threading.Thread | None = None
        self._closing = False

    def _wait_ready(self) -> CoreInfo:
        while not self._conn.poll(0.1):
            if not self.process.is_alive():
                raise EngineCoreError(f"the engine core exited (code {self.process.exitcode}) before it was ready")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise EngineCoreError(f"the engine core exited (code {self.process.exitcode}) before it was ready") \
                from None
        if kind == "failed":
            self.process.join(10)
            raise payload
        return payload

    # -- the serving process's side -----------------------------------------------------------------------------
    def start(self, on_step: Callable[[list[RequestOutput], EngineCounters], None],
              on_death: Callable[[BaseException], None]) -> None:
        self._reader = threading.Thread(target=self._read, args=(on_step, on_death), name="engine-core-reader",
                                        daemon=True)
        self._reader.start()

    def add(self, client: str | None, requests: list[CoreRequest]) -> Future:
        batch: set[str] = set()
        for request_id, *_ in requests:
            if request_id in self._requests or request_id in batch:
                raise ValueError(f"request_id ({request_id!r}) is already in use")
            batch.add(request_id)
        for request_id, prompt_ids, params, _, _ in requests:
            self._requests[request_id] = _Tracked(prompt_ids, [] if params.logprobs is not None else None)
        future = self._call(("add", client, requests))
        future.add_done_callback(lambda f: self._forget(requests) if f.exception() is not None else None)
        return future

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(("abort", request_ids))

    def call(self, name: str) -> Future:
        return self._call(("call", name))

    def alive(self) -> bool:
        return self.error is None and self.process.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (it aborts what still runs, then exits) and wait for it; a core that does not exit in
        ``timeout`` is killed. Calling it again does nothing."""
        if self._closing:
            return
        self._closing = True
        try:
            self._send(("shutdown",))
        except (OSError, EngineCoreError):  # already gone
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("engine core (pid %s) did not stop in %.0f s: killing it", self.process.pid, timeout)
            self.process.kill()
            self.process.join(5)
        if self._reader is not None:
            self._reader.join(timeout)
        self._conn.close()

    def _call(self, message: tuple) -> Future:
        future: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        try:
            self._send((message[0], call_id, *message[1:]))
        except BaseException as e:
            self._calls.pop(call_id, None)
            future.set_exception(e)
        return future

    def _send(self, message: tuple) -> None:
        if self.error is not None:
            raise EngineCoreError(f"the engine core is not running: {self.error!r}")
        with self._send_lock:
            self._conn.send(message)

    def _forget(self, requests: list[CoreRequest]) -> None:
        for request_id, *_ in requests:
            self._requests.pop(request_id, None)

    # -- the reader thread --------------------------------------------------------------------------------------
    def _read(self, on_step, on_death) -> None:
        error: BaseException | None = None
        try:
            while True:
                message = self._conn.recv()
                self.last_heard = time.monotonic()
                kind = message[0]
                if kind == "step":
                    outputs = [out for out in map(self._rebuild, message[1]) if out is not None]
                    on_step(outputs, message[2])
                elif kind == "reply":
                    _, call_id, failure, value = message
                    future = self._calls.pop(call_id)
                    future.set_exception(failure) if failure is not None else future.set_result(value)
                elif kind == "died":
                    error = EngineCoreError(f"the engine core failed: {message[1]!r}")
                    break
                elif kind == "stopped":
                    break
        except (EOFError, OSError):
            if not self._closing:
                self.process.join(1)
                error = EngineCoreError(f"the engine core exited (code {self.process.exitcode})")
        except BaseException as e:  # a bug on this side: the outputs can no longer be trusted
            log.exception("engine core reader failed")
            error = e
        if error is not None:
            self.error = error
        for future in self._calls.values():
            future.set_exception(error or EngineCoreError("the engine core stopped"))
        self._calls.clear()
        if error is not None:
            on_death(error)

    def _rebuild(self, d: OutputDelta) -> RequestOutput | None:
        tracked = self._requests.get(d.request_id)
        if tracked is None:  # an admission that failed: the caller already has its error
            return None
        tracked.token_ids.extend(d.new_token_ids)
        if tracked.logprobs is not None and d.new_logprobs:
            tracked.logprobs.extend(d.new_logprobs)
        if d.finished:
            del self._requests[d.request_id]
        return RequestOutput(
            request_id=d.request_id, prompt_token_ids=tracked.prompt_ids, token_ids=list(tracked.token_ids),
            text=d.text, finished=d.finished, finish_reason=d.finish_reason, stop_reason=d.stop_reason,
            logprobs=list(tracked.logprobs) if tracked.logprobs is not None else None,
            num_cached_tokens=d.num_cached_tokens, new_token_ids=d.new_token_ids, times=d.times,
            num_preemptions=d.num_preemptions)


@dataclass
class _Tracked:
    prompt_ids: list[int]
    logprobs: list[dict[int, float]] | None
    token_ids: list[int] = field(default_factory=list)


# -- the core process -----------------------------------------------------------------------------------------------
def _core_main(conn, build: Callable[[], CoreSetup], log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engine-core] %(name)s: %(message)s")
    try:
        setup = build()
        engine = setup.engine
        conn.send(("ready", CoreInfo(engine.config, engine.max_model_len, engine.vocab_size,
                                     frozenset(engine.stops.eos_token_ids), setup.summary)))
    except BaseException as e:
        conn.send(("failed", _picklable(e)))
        return
    _CoreLoop(conn, setup).run()


class _CoreLoop:
    def __init__(self, conn, setup: CoreSetup) -> None:
        self.conn, self.setup, self.engine = conn, setup, setup.engine

    def run(self) -> None:
        engine = self.engine
        try:
            while True:
                busy = engine.has_unfinished_requests()
                if (self.conn.poll(0) if busy else self.conn.poll(1.0)) and not self._receive():
                    break
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    if self.setup.after_step is not None:
                        self.setup.after_step()
                    self._send_step(outputs)
        except (EOFError, OSError):  # the serving process is gone: nobody to serve
            log.warning("the serving process closed the pipe: stopping")
        except BaseException as e:  # a step that raises leaves the engine in an unknown state: stop serving
            log.exception("engine core failed")
            self._try_send(("died", _picklable(e)))
        finally:
            for request_id in list(engine.requests):
                engine.abort(request_id)
            if self.setup.close is not None:
                self.setup.close()
            self._try_send(("stopped",))

    def _receive(self) -> bool:
        """Apply every message waiting; False on shutdown."""
        aborted: list[RequestOutput] = []
        while self.conn.poll(0):
            message = self.conn.recv()
            kind = message[0]
            if kind == "add":
                self._add(*message[1:])
            elif kind == "abort":
                aborted.extend(out for out in map(self.engine.abort, message[1]) if out is not None)
            elif kind == "call":
                _, call_id, name = message
                try:
                    self.conn.send(("reply", call_id, None, self.setup.calls[name]()))
                except Exception as e:
                    self.conn.send(("reply", call_id, _picklable(e), None))
            elif kind == "shutdown":
                self._send_step(aborted)
                return False
        if aborted:
            self._send_step(aborted)
        return True

    def _add(self, call_id: int, client: str | None, requests: list[CoreRequest]) -> None:
        added = []
        try:
            for request_id, prompt_ids, params, prefix_source, arrival in requests:
                self.engine.add_request(request_id, prompt_ids, params, prefix_source, arrival, client=client)
                added.append(request_id)
        except Exception as e:
            for request_id in added:
                self.engine.abort(request_id)
            self.conn.send(("reply", call_id, _picklable(e), None))
            return
        self.conn.send(("reply", call_id, None, None))

    def _send_step(self, outputs: list[RequestOutput]) -> None:
        deltas = [OutputDelta(o.request_id, o.new_token_ids, _new_logprobs(o), o.text, o.finished, o.finish_reason,
                              o.stop_reason, o.num_cached_tokens, o.times, o.num_preemptions) for o in outputs]
        self.conn.send(("step", deltas, self.engine.counters()))

    def _try_send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):
            pass


def _new_logprobs(out: RequestOutput) -> list[dict[int, float]] | None:
    if out.logprobs is None or not out.new_token_ids:
        return None
    return out.logprobs[-len(out.new_token_ids):]


def _picklable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (ValueError, QueueFullError, ...), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
