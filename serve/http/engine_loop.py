"""``EngineLoop``: runs ``LLMEngine.step()`` on a background thread and streams outputs to asyncio callers.

The engine is not thread-safe, so every touch of it happens under one lock: the loop holds it for a step,
``submit`` for the (fast) admission of a request group. Aborts are queued without waiting and applied at the
top of the next iteration, so a cancelled request's KV blocks are free within one engine step. torch releases
the GIL inside its kernels, so the event loop keeps serving HTTP while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve.engine import LLMEngine
from serve.engine.outputs import RequestOutput
from serve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a step raised, or the server is shutting down)."""


@dataclass
class SubRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefix_source: str | None = None  # an earlier sub-request with the same prompt (see LLMEngine.add_request)
    arrival: float | None = None  # time.monotonic() when the HTTP request was ready to submit (TTFT starts there)


class RequestGroup:
    """The sub-requests of one HTTP request (prompts x ``n``); ``queue`` receives ``(index, RequestOutput)``
    for each output, or ``(index, EngineDeadError)`` if the engine dies first."""

    def __init__(self, subs: list[SubRequest], loop: asyncio.AbstractEventLoop) -> None:
        self.subs = subs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished = {s.request_id: i for i, s in enumerate(subs)}
        self.client = subs[0].request_id if subs else None  # the engine shares its batch fairly between groups
        self._loop = loop

    def push(self, index: int, item: RequestOutput | Exception) -> None:
        push_all([(self, index, item)])


def push_all(items: list[tuple[RequestGroup, int, RequestOutput | Exception]]) -> None:
    """Hand each ``(group, index, item)`` to its group's queue from another thread: one wake-up of the event loop
    per call (a step's outputs), not one per output."""
    if not items:
        return
    try:
        items[0][0]._loop.call_soon_threadsafe(_put_all, items)  # every group of a server shares its one loop
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


def _put_all(items) -> None:
    for group, index, item in items:
        group.queue.put_nowait((index, item))


def route(groups: dict[str, tuple[RequestGroup, int]], outputs: list[RequestOutput]) -> list:
    """``(group, index, output)`` for each output of a known request; a finished one leaves ``groups``."""
    items = []
    for out in outputs:
        entry = groups.get(out.request_id)
        if entry is None:
            continue
        group, index = entry
        if out.finished:
            del groups[out.request_id]
            group.unfinished.pop(out.request_id, None)
        items.append((group, index, out))
    return items


class EngineLoop:
    """``start()``; ``await submit(subs) -> RequestGroup``; ``abort(group)``; ``shutdown()``.

    ``on_step(counters, outputs)`` runs on the loop thread after every step and every batch of aborts (metrics).
    ``health()`` is
    ``(ok, reason)``: not ok when the thread is dead or one step has run longer than ``stall_s``.
    """

    def __init__(self, engine: LLMEngine, on_step: Callable | None = None, stall_s: float = 60.0) -> None:
        self.engine = engine
        self.on_step = on_step
        self.stall_s = stall_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._groups: dict[str, tuple[RequestGroup, int]] = {}  # request_id -> (group, index)
        self._stop = False
        self._step_started: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- called from the event loop -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    async def submit(self, subs: list[SubRequest]) -> RequestGroup:
        """Admit all of ``subs`` or none (``ValueError`` / ``QueueFullError`` / ``EngineDeadError``)."""
        group = RequestGroup(subs, asyncio.get_running_loop())
        await asyncio.to_thread(self._admit, group)
        self._wake.set()
        return group

    def abort(self, group: RequestGroup) -> None:
        """Abort what is still running of ``group``; safe to call any number of times, from any thread."""
        for request_id in list(group.unfinished):
            self._aborts.put(request_id)
        self._wake.set()

    def abort_all(self) -> None:
        for request_id in list(self._groups):
            self._aborts.put(request_id)
        self._wake.set()

    def busy(self) -> bool:
        """Whether any admitted sub-request is unfinished."""
        return bool(self._groups)

    def health(self) -> tuple[bool, str]:
        if self.error is not None:
            return False, f"engine loop died: {self.error!r}"
        if not self._thread.is_alive():
            return False, "engine loop is not running"
        started = self._step_started
        if started is not None and time.monotonic() - started > self.stall_s:
            return False, f"engine step running for {time.monotonic() - started:.0f} s (> {self.stall_s:.0f} s)"
        return True, "ok"

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything still running, stop the thread and wait for it."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # -- the loop thread ----------------------------------------------------------------------------------------
    def _admit(self, group: RequestGroup) -> None:
        with self._lock:
            if self.error is not None or self._stop:
                raise EngineDeadError("the engine is not accepting requests (shutting down or dead)")
            added = []
            try:
                for index, sub in enumerate(group.subs):
                    self.engine.add_request(sub.request_id, sub.prompt_ids, sub.params, sub.prefix_source,
                                            sub.arrival, client=group.client)
                    added.append(sub.request_id)
                    self._groups[sub.request_id] = (group, index)
            except BaseException:
                for request_id in added:
                    self.engine.abort(request_id)
                    self._groups.pop(request_id, None)
                raise

    def _run(self) -> None:
        try:
            while not self._stop:
                self._apply_aborts()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                with self._lock:
                    self._step_started = time.monotonic()
                    outputs = self.engine.step()
                    self._step_started = None
                    if self.on_step is not None:
                        self.on_step(self.engine.counters(), outputs)
                self._deliver(outputs)
        except BaseException as e:  # a step that raises leaves the engine in an unknown state: stop serving
            log.exception("engine loop died")
            self.error = e
        finally:
            self._step_started = None
            self._fail_all()

    def _apply_aborts(self) -> None:
        outputs = []
        while True:
            try:
                request_id = self._aborts.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                out = self.engine.abort(request_id)
            if out is not None:
                outputs.append(out)
        if outputs:
            if self.on_step is not None:
                with self._lock:
                    self.on_step(self.engine.counters(), outputs)
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        push_all(route(self._groups, outputs))

    def _fail_all(self) -> None:
        reason = EngineDeadError(f"engine stopped: {self.error!r}" if self.error else "server shutting down")
        with self._lock:
            for request_id, (group, index) in list(self._groups.items()):
                try:
                    self.engine.abort(request_id)
                except Exception:  # a dead engine may fail here too; the caller still gets its error
                    log.exception("abort of %s failed", request_id)
                group.unfinished.pop(request_id, None)
                group.push(index, reason)
            self._groups.clear()
