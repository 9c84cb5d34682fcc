"""Shared timing helpers for benchmarks: interleaved repetitions so that machine noise hits every peer."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timing them round-robin ``reps`` times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def memory_read_bandwidth(num_bytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Bytes/s of a streaming read (``sum`` over a buffer far larger than the caches); best of ``reps``."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps + 1):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def fma_peak_flops(threads: int, seconds: float = 0.2) -> float | None:
    """The CPU's fp32 FLOP/s on ``threads`` threads from ``csrc/fma_peak.c`` (independent FMA chains, the widest
    vectors the CPU runs; best of 3), or None without a C compiler / AVX2."""
    from pathlib import Path

    from moe.kernels.native import FLOAT, INT, LONG, load_library

    signatures = {"fma_peak": ([LONG, INT, INT], FLOAT), "fma_lanes": ([], INT)}
    lib = load_library(Path(__file__).parent / "csrc" / "fma_peak.c", signatures)
    if lib is None:
        return None
    best = 0.0
    for lanes in sorted({8, lib.fma_lanes()}):
        iters = int(seconds * 4e9 / lanes)  # ~seconds at a few GHz
        lib.fma_peak(1000, threads, lanes)
        for _ in range(3):
            start = time.perf_counter()
            lib.fma_peak(iters, threads, lanes)
            best = max(best, threads * iters * 12 * lanes * 2 / (time.perf_counter() - start))
    return best


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def machine_load() -> str:
    """The 1, 5 and 15 minute load averages, noted with every figure (these machines are shared)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())
