"""``CoreEngineLoop``: :class:`serve.http.engine_loop.EngineLoop`'s interface over an engine core in its own
process (:class:`serve.engine.core_process.EngineCoreClient`).

The core steps on its own; this side admits groups (``submit`` resolves once the core has admitted all of them or
none), queues aborts without waiting, and routes each step's outputs, read on the client's reader thread, to their
groups in one wake-up of the event loop. ``health()`` is not ok once the core has died or exited, or when requests
are in flight and the core has sent nothing (it reports after every step) for ``stall_s``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from serve.engine.core_process import EngineCoreClient, EngineCoreError
from serve.engine.engine import EngineCounters
from serve.engine.outputs import RequestOutput
from serve.http.engine_loop import EngineDeadError, RequestGroup, SubRequest, push_all, route


class CoreEngineLoop:
    def __init__(self, core: EngineCoreClient, on_step: Callable | None = None, stall_s: float = 60.0) -> None:
        self.core, self.on_step, self.stall_s = core, on_step, stall_s
        self._groups: dict[str, tuple[RequestGroup, int]] = {}  # request_id -> (group, index)
        self._lock = threading.Lock()  # _groups: the event loop adds, the reader thread routes
        self._stopping = False
        self._busy_since = 0.0  # when requests last went in flight after none were: the core had no reason to talk
        self.error: BaseException | None = None

    def start(self) -> None:
        self.core.start(self._on_step, self._on_death)

    async def submit(self, subs: list[SubRequest]) -> RequestGroup:
        """Admit all of ``subs`` or none (``ValueError`` / ``QueueFullError`` / ``EngineDeadError``)."""
        group = RequestGroup(subs, asyncio.get_running_loop())
        if self._stopping or not self.core.alive():
            raise EngineDeadError("the engine is not accepting requests (shutting down or dead)")
        with self._lock:
            if not self._groups:
                self._busy_since = time.monotonic()
            for index, sub in enumerate(subs):
                self._groups[sub.request_id] = (group, index)
        requests = [(s.request_id, s.prompt_ids, s.params, s.prefix_source, s.arrival) for s in subs]
        try:
            await asyncio.wrap_future(self.core.add(group.client, requests))
        except EngineCoreError as e:
            self._drop(subs)
            raise EngineDeadError(str(e)) from None
        except BaseException:
            self._drop(subs)
            raise
        return group

    def abort(self, group: RequestGroup) -> None:
        """Abort what is still running of ``group``; safe to call any number of times, from any thread."""
        self._abort(list(group.unfinished))

    def abort_all(self) -> None:
        with self._lock:  # not held while sending: the reader thread needs it to drain the core's messages
            request_ids = list(self._groups)
        self._abort(request_ids)

    def busy(self) -> bool:
        return bool(self._groups)

    def health(self) -> tuple[bool, str]:
        if self.error is not None:
            return False, f"engine core died: {self.error}"
        if not self.core.process.is_alive():
            return False, f"engine core is not running (exit code {self.core.process.exitcode})"
        quiet = time.monotonic() - max(self.core.last_heard, self._busy_since)
        if self._groups and quiet > self.stall_s:
            return False, f"engine core silent for {quiet:.0f} s (> {self.stall_s:.0f} s) with requests in flight"
        return True, "ok"

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (it aborts what still runs) and wait for it; every group still waiting gets an error."""
        self._stopping = True
        self.core.shutdown(timeout)
        self._fail_all(EngineDeadError("server shutting down"))

    # -- the core's reader thread -------------------------------------------------------------------------------
    def _on_step(self, outputs: list[RequestOutput], counters: EngineCounters) -> None:
        if self.on_step is not None:
            self.on_step(counters, outputs)
        with self._lock:
            items = route(self._groups, outputs)
        push_all(items)

    def _on_death(self, error: BaseException) -> None:
        self.error = error
        self._fail_all(EngineDeadError(f"engine stopped: {error}"))

    def _abort(self, request_ids: list[str]) -> None:
        try:
            self.core.abort(request_ids)
        except (EngineCoreError, OSError):  # a dead core has no requests left to abort
            pass

    def _drop(self, subs: list[SubRequest]) -> None:
        with self._lock:
            for sub in subs:
                self._groups.pop(sub.request_id, None)

    def _fail_all(self, reason: EngineDeadError) -> None:
        with self._lock:
            items: list = [(group, index, reason) for group, index in self._groups.values()]
            for group, _ in self._groups.values():
                group.unfinished.clear()
            self._groups.clear()
        push_all(items)
