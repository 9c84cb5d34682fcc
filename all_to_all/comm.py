"""``EPComm``: the collectives an expert-parallel layer uses, with a timeout and a named-rank failure report.

Every collective of a dispatcher goes through one ``EPComm``, which

- sends payloads of a dtype gloo lacks (fp8, int16, ...) as their ``uint8`` bytes, on every backend (no
  collective here does arithmetic on the payload, so bytes are exact);
- bounds the wait on gloo (``work.wait(timeout)``); NCCL is bounded by the process group's own timeout and
  watchdog, since a host-side wait there would be a host sync;
- on failure, asks the c10d store which ranks are still alive and raises :class:`CollectiveError` naming the
  ones that did not answer (a dead peer makes gloo fail at once, "Connection closed by peer [ip]:port",
  without saying which rank that was);
- counts the payload bytes handed to each collective (:class:`CommStats`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# dtypes ProcessGroupGloo's collectives accept (probed with torch 2.13: fp8 and int16 raise "Invalid scalar type");
# NCCL accepts these too, and fp8 only with recent NCCL, so the same rule serves both
_WIRE_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
                torch.int32, torch.int64, torch.bool}


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; torch >= 2.6 is supported
# (getattr: a torch built without distributed support must still import moe, which imports this package)
_all_gather_single: Any = (getattr(dist, "all_gather_single", None)
                           or getattr(dist, "all_gather_into_tensor", None))


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the ranks that did not answer."""


@dataclass
class CommStats:
    """Per-dispatcher traffic and host-sync counters (bytes this rank handed to / got from each collective)."""

    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # host wall time per collective label
    host_syncs: int = 0
    host_sync_s: float = 0.0

    def add(self, label: str, sent: int, received: int, seconds: float) -> None:
        self.bytes_sent[label] = self.bytes_sent.get(label, 0) + sent
        self.bytes_received[label] = self.bytes_received.get(label, 0) + received
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.bytes_received.clear()
        self.seconds.clear()
        self.host_syncs, self.host_sync_s = 0, 0.0


class EPComm:
    """One expert-parallel process group (``None``: the default group) with a failure budget of ``timeout_s``.

    A collective that fails or hangs raises :class:`CollectiveError` within ``timeout_s``: the wait itself
    gets ``timeout_s - grace_s``, then up to ``grace_s`` is spent finding which ranks still answer.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout_s: float = 60.0,
                 grace_s: float | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be > 0")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.global_ranks = dist.get_process_group_ranks(self.group)
        self.backend = str(dist.get_backend(self.group))
        self.grace_s = min(5.0, 0.25 * timeout_s) if grace_s is None else grace_s
        if not 0 <= self.grace_s < timeout_s:
            raise ValueError(f"grace_s ({self.grace_s}) must be in [0, timeout_s ({timeout_s}))")
        self.timeout_s = timeout_s
        self.stats = CommStats()

    @property
    def is_gloo(self) -> bool:
        return self.backend == "gloo"

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None = None,
                   in_splits: list[int] | None = None, label: str = "all_to_all") -> torch.Tensor:
        """``all_to_all_single`` along dim 0 (equal chunks when the splits are ``None``); fills and returns ``out``."""
        wire_out, wire_in = self._wire(out), self._wire(inp)
        self._run(label, nbytes(inp), nbytes(out), lambda: dist.all_to_all_single(
            wire_out, wire_in, out_splits, in_splits, group=self.group, async_op=True))
        return out

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, label: str = "all_gather") -> torch.Tensor:
        """``all_gather_single``: ``out`` is the ``world_size`` inputs stacked along dim 0."""
        wire_out, wire_in = self._wire(out), self._wire(inp)
        self._run(label, nbytes(inp), nbytes(out), lambda: _all_gather_single(
            wire_out, wire_in, group=self.group, async_op=True))
        return out

    def all_reduce_max(self, value_1: torch.Tensor, label: str = "all_reduce_max") -> torch.Tensor:
        self._run(label, nbytes(value_1), nbytes(value_1), lambda: dist.all_reduce(
            value_1, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return value_1

    def to_host(self, t: torch.Tensor) -> list:
        """``t.tolist()``, timed and counted. NOTE: host sync (on a GPU it waits for all queued work)."""
        start = time.perf_counter()
        values = t.tolist()  # NOTE: host sync
        self.stats.host_syncs += 1
        self.stats.host_sync_s += time.perf_counter() - start
        return values

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself, or a byte view of it when a backend may not carry its dtype (fp8)."""
        if t.dtype not in _WIRE_DTYPES:
            return t.view(torch.uint8)  # same memory, so a received ``out`` is filled in place
        return t

    def _run(self, label: str, sent: int, received: int, start_op: Callable[[], dist.Work]) -> None:
        begin = time.perf_counter()
        work = start_op()  # argument errors (sizes, dtypes) raise here, unchanged: they are not a peer's fault
        try:
            if self.is_gloo:
                work.wait(timedelta(seconds=self.timeout_s - self.grace_s))
            else:
                work.wait()  # NCCL: stream-ordered; bounded by the group's timeout and watchdog
        except RuntimeError as err:
            raise CollectiveError(self._failure_report(label, err)) from err
        self.stats.add(label, sent, received, time.perf_counter() - begin)

    def _failure_report(self, label: str, err: Exception) -> str:
        silent, store_note = self._silent_ranks()
        names = ", ".join(self._rank_name(r) for r in silent) or "none (all ranks answered)"
        return (f"collective '{label}' failed on rank {self._rank_name(self.rank)} of {self.world_size} "
                f"(backend {self.backend}, timeout {self.timeout_s:g} s). Rank(s) that did not answer within "
                f"{self.grace_s:g} s, dead or hung: {names}.{store_note} Cause: {str(err).splitlines()[0][:300]}")

    def _silent_ranks(self) -> tuple[list[int], str]:
        """Every surviving rank of the group writes an "alive" key; the ranks whose key never comes are silent."""
        waiting = set(range(self.world_size)) - {self.rank}
        prefix = "moe_ep_alive/" + "-".join(map(str, self.global_ranks)) + "/"
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(prefix + str(self.rank), "1")
            deadline = time.monotonic() + self.grace_s
            while waiting:
                waiting = {r for r in waiting if not store.check([prefix + str(r)])}
                if not waiting or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except (RuntimeError, ValueError) as err:  # the store lives on global rank 0 (tcp:// and env:// init)
            note = (f" The c10d store (hosted by global rank 0) was unreachable ({type(err).__name__}): "
                    "rank 0 may be dead.")
            return sorted(waiting), note
        return sorted(waiting), ""

    def _rank_name(self, group_rank: int) -> str:
        global_rank = self.global_ranks[group_rank]
        return str(group_rank) if global_rank == group_rank else f"{group_rank} (global {global_rank})"


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
