"""Run a function on ``W`` gloo ranks in spawned processes and collect what each returns; never leak a process.

``run_ranks(fn, W, *args)`` -> ``[RankResult]``: ``fn(rank, world_size, *args)`` runs in a fresh process with
``torch.distributed`` initialised (gloo, a free TCP port, one thread). A rank that raises reports its
traceback; one that dies reports its exit code. Every child is killed and joined before returning.
Failure tests pass ``barrier=False`` (the group is broken) and ``wait_for`` (the ranks expected to report;
the others, e.g. a hung one, are killed once those are in).
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp


@dataclass
class RankResult:
    ok: bool
    value: Any  # what fn returned, or a traceback / exit description

    def unwrap(self) -> Any:
        if not self.ok:
            raise AssertionError(f"rank failed:\n{self.value}")
        return self.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
              pg_timeout_s: float = 60.0, barrier: bool = True,
              wait_for: set[int] | None = None) -> list[RankResult | None]:
    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, port, pg_timeout_s, barrier, args, results_q),
                         daemon=True) for rank in range(world_size)]
    results: dict[int, RankResult] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        wanted = set(range(world_size)) if wait_for is None else set(wait_for)
        while not wanted <= set(results):
            if time.monotonic() > deadline:
                missing = sorted(wanted - set(results))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s} s")
            try:
                rank, ok, value = results_q.get(timeout=0.5)
                results[rank] = RankResult(ok, value)
            except queue_mod.Empty:
                for rank, p in enumerate(procs):
                    if rank in results or p.exitcode is None:
                        continue
                    _drain(results_q, results)  # it may have queued its result just before exiting
                    if rank not in results:
                        results[rank] = RankResult(False, f"rank {rank} exited with code {p.exitcode}")
        return [results.get(r) for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        results_q.close()


def _drain(results_q, results: dict) -> None:
    try:
        while True:
            rank, ok, value = results_q.get(timeout=1.0)
            results[rank] = RankResult(ok, value)
    except queue_mod.Empty:
        pass


def _worker(fn, rank, world_size, port, pg_timeout_s, barrier, args, results_q) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    ok = False
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        value = fn(rank, world_size, *args)
        if barrier:
            dist.barrier()  # nobody (rank 0 hosts the store) leaves while a peer still talks
        ok = True
    except BaseException:  # noqa: BLE001 -- reported to the parent, which fails the test
        value = traceback.format_exc()
    results_q.put((rank, ok, value))
    results_q.close()
    results_q.join_thread()
    if ok and barrier:
        dist.destroy_process_group()
    os._exit(0)  # a failed gloo group can block interpreter shutdown
