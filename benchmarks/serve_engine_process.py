"""``moe-serve`` with the engine core in its own process (``server.engine_process=true``, the default) against the
engine on a thread of the server's process (``false``), under the same Poisson load, interleaved, one run.

    python -m benchmarks.serve_engine_process [--rates 4,inf] [--repeats 2] [--requests 64]

The load and the printed figures are :mod:`benchmarks.peers.vllm_serve`'s (the embedded default model, one
intra-op thread unless ``OMP_NUM_THREADS`` says otherwise, the idle server SIGSTOPped during the other's turn); per
rate the best turn of each, side by side, with the ratios (throughput: process / thread; latencies: thread /
process, above 1 meaning the process split is better).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_load
from benchmarks.peers.startup import seconds_to_healthy
from benchmarks.peers.vllm_serve import compare_rates, one_turn, stop_all
from benchmarks.serve_load import make_requests
from benchmarks.server import free_port

MODES = {"process": "server.engine_process=true", "thread": "server.engine_process=false"}


def start(mode: str, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serve.launch.cli", f"server.port={port}", f"hydra.run.dir={log_path.parent}",
           "server.log_level=warning", MODES[mode]]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="4,inf")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    requests = make_requests(args.requests, (16, 512), (8, 256), args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="serve-engine-process-"))
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for mode in MODES:
            (tmp / mode).mkdir()
            port, t0 = free_port(), time.monotonic()
            process = start(mode, port, tmp / mode / "server.log")
            url = f"http://127.0.0.1:{port}"
            print(f"{mode}: healthy after {seconds_to_healthy(url, process, t0, 120):.1f} s; load {machine_load()}",
                  flush=True)
            servers[mode] = (process, url)
            one_turn(url, requests[:2], float("inf"), None, args.seed)  # warm-up
            os.killpg(process.pid, signal.SIGSTOP)
        compare_rates(servers, {mode: None for mode in MODES}, requests, args.rates, args.repeats, args.seed,
                      ("process", "thread"))
    finally:
        stop_all(servers)
    print(f"load at the end {machine_load()}")


if __name__ == "__main__":
    main()
