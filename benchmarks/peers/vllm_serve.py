"""``moe-serve`` against ``vllm serve`` (vLLM's CPU build) under the same Poisson load, interleaved, one run.

    bash benchmarks/peers/install_vllm.sh          # once: ~/peers/vllm
    python -m benchmarks.peers.vllm_serve [--rates 4,inf] [--repeats 2] [--requests 64] [--vllm ~/peers/vllm/bin/vllm]

Both servers serve the embedded default model (fp32, max_model_len 2048) on loopback ports, started once; the
load is :mod:`benchmarks.serve_load`'s (token-id prompts of 16-512 tokens, 8-256 output tokens, streamed with
``ignore_eos``, at most 32 in flight). For each rate, turns alternate between the two ``--repeats`` times, who
goes first swapping each turn, the other server stopped (SIGSTOP) meanwhile: vLLM's idle engine core polls and
would load our turns. Printed per turn: the machine load, output tok/s, TTFT / TPOT / ITL p50 and p99; then per
rate the best turn of each (highest throughput) side by side, with the ratios (throughput: ours / vLLM; latencies:
vLLM / ours, so above 1 means ours is better) and whether every request of both streamed its tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_load
from benchmarks.peers.startup import seconds_to_healthy, start
from benchmarks.serve_load import make_requests, run_load
from benchmarks.server import free_port


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summarise(results, elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    return {"ok": len(ok), "n": len(results), "tok_s": sum(r.output_tokens for r in ok) / elapsed,
            "ttft_p50": quantile([r.ttft for r in ok], 0.5), "ttft_p99": quantile([r.ttft for r in ok], 0.99),
            "tpot_p50": quantile(tpot, 0.5), "tpot_p99": quantile(tpot, 0.99),
            "itl_p50": quantile(itl, 0.5), "itl_p99": quantile(itl, 0.99),
            "itl_mean": statistics.fmean(itl) if itl else float("nan")}


def line(s: dict) -> str:
    ms = lambda key: f"{s[key] * 1e3:7.1f}"  # noqa: E731
    return (f"{s['tok_s']:7.1f} tok/s, TTFT p50/p99 {ms('ttft_p50')}/{ms('ttft_p99')} ms, TPOT p50/p99 "
            f"{ms('tpot_p50')}/{ms('tpot_p99')} ms, ITL p50/p99 {ms('itl_p50')}/{ms('itl_p99')} ms, "
            f"ok {s['ok']}/{s['n']}")


def one_turn(url: str, requests, rate: float, model: str, seed: int) -> dict:
    results, elapsed = asyncio.run(run_load(url, requests, rate, 32, seed, model))
    return summarise(results, elapsed)


def compare_rates(servers: dict[str, tuple[subprocess.Popen, str]], models: dict[str, str | None], requests,
                  rates: str, repeats: int, seed: int, labels: tuple[str, str]) -> None:
    """For each of ``rates`` (comma-separated, ``inf`` for all at once): ``repeats`` turns of the two servers
    (``servers``: name -> (process, url), started and SIGSTOPped; the first is ours), who goes first swapping each
    turn, the other stopped meanwhile; prints each turn, the best turn of each side by side, and the ratios
    (throughput: first / second; latencies: second / first, so above 1 means the first is better)."""
    first, second = servers
    for rate in (float(r) for r in rates.split(",")):
        best: dict[str, dict] = {}
        for turn in range(repeats):
            for kind in ((first, second) if turn % 2 == 0 else (second, first)):
                process, url = servers[kind]
                os.killpg(process.pid, signal.SIGCONT)
                try:
                    stats = one_turn(url, requests, rate, models[kind], seed)
                finally:
                    os.killpg(process.pid, signal.SIGSTOP)
                print(f"rate {rate} turn {turn} {kind:4}: load {machine_load()}; {line(stats)}", flush=True)
                if kind not in best or stats["tok_s"] > best[kind]["tok_s"]:
                    best[kind] = stats
        ours, theirs = best[first], best[second]
        print(f"rate {rate}: best of {repeats}\n  {labels[0]}: {line(ours)}\n  {labels[1]}: {line(theirs)}")
        ratios = {key: theirs[key] / ours[key] for key in ("ttft_p50", "ttft_p99", "tpot_p50", "itl_p99")}
        print(f"  throughput {labels[0]}/{labels[1]} {ours['tok_s'] / theirs['tok_s']:.2f}x; {labels[1]}/{labels[0]} "
              f"(above 1: {labels[0]} better) " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)


def stop_all(servers: dict[str, tuple[subprocess.Popen, str]]) -> None:
    """SIGTERM every server's process group (resumed first), waiting for each; one that does not exit is killed."""
    for process, _ in servers.values():
        os.killpg(process.pid, signal.SIGCONT)
        os.killpg(process.pid, signal.SIGTERM)
    for process, _ in servers.values():
        try:
            process.wait(timeout=60)
        except Exception:  # noqa: BLE001  (still running: kill it, the benchmark is over either way)
            os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="4,inf")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm", default=str(Path.home() / "peers/vllm/bin/vllm"))
    args = ap.parse_args()
    requests = make_requests(args.requests, (16, 512), (8, 256), args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="serve-peer-"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # ours: one intra-op thread, as vLLM's default binds one
    servers = {}
    try:
        for kind in ("ours", "vllm"):
            port = free_port()
            t0 = time.monotonic()
            process = start(kind, port, args.vllm, str(tmp / f"{kind}.log"))
            url = f"http://127.0.0.1:{port}"
            healthy = seconds_to_healthy(url, process, t0, 600)
            servers[kind] = (process, url)
            print(f"{kind} healthy after {healthy:.1f} s (log {tmp / f'{kind}.log'}); load {machine_load()}",
                  flush=True)
            os.killpg(process.pid, signal.SIGSTOP)
        model = {"ours": None, "vllm": "default"}
        for kind, (process, url) in servers.items():  # a warm-up of two requests each
            os.killpg(process.pid, signal.SIGCONT)
            one_turn(url, requests[:2], float("inf"), model[kind], args.seed)
            os.killpg(process.pid, signal.SIGSTOP)
        compare_rates(servers, model, requests, args.rates, args.repeats, args.seed, ("ours", "vLLM"))
    finally:
        stop_all(servers)
    print(f"load at the end {machine_load()}")


if __name__ == "__main__":
    main()
