"""Start-up of the HTTP servers: process start to ``/health`` 200, then the first request's TTFT against the
steady state's, for ``moe-serve`` and (when installed) vLLM's CPU build, on the default model.

    python -m benchmarks.peers.startup [--repeats 2] [--vllm ~/peers/vllm/bin/vllm] [--skip-vllm]

Each server is started fresh ``--repeats`` times (ours and vLLM alternated); on each, the first streamed
completion (a 64-token token-id prompt, 16 greedy tokens) is timed, then ``--steady`` more of the same shape with
other prompts, whose median TTFT is the steady state. Printed per start: seconds to healthy, first TTFT, steady
TTFT and their ratio (target: first within 2x of steady, healthy under 10 s), with the machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import machine_load
from benchmarks.server import free_port
from serve.engine.config import DEFAULT_MODEL


def start(kind: str, port: int, vllm: str, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if kind == "ours":
        cmd = [sys.executable, "-m", "serve.launch.cli", f"server.port={port}",
               f"hydra.run.dir={os.path.dirname(log_path)}", "server.log_level=info"]
    else:
        cmd = [vllm, "serve", str(DEFAULT_MODEL), "--port", str(port), "--dtype", "float32",
               "--served-model-name", "default", "--max-model-len", "2048",
               "--gpu-memory-utilization", "0.3"]  # on the CPU: the share of memory it reserves (0.92 can fail)
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def seconds_to_healthy(url: str, process: subprocess.Popen, started: float, timeout: float) -> float:
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"not healthy after {timeout} s")


def ttft(url: str, model: str, prompt: list[int]) -> float:
    """Seconds from sending a streamed completion to its first content chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True,
            "ignore_eos": True}
    sent, first = time.perf_counter(), None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():  # read to the end: the next request starts on an idle server
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    first = time.perf_counter() - sent
    if first is None:
        raise RuntimeError("no token came back")
    return first


def one_start(kind: str, vllm: str, steady: int, timeout: float) -> dict:
    port, workdir = free_port(), tempfile.mkdtemp(prefix=f"startup-{kind}-")
    log_path = os.path.join(workdir, "server.log")
    started = time.monotonic()
    process = start(kind, port, vllm, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        healthy = seconds_to_healthy(url, process, started, timeout)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        prompts = [[(7 * i + j) % 1000 + 10 for j in range(64)] for i in range(steady + 1)]
        first = ttft(url, model, prompts[0])
        rest = statistics.median(ttft(url, model, p) for p in prompts[1:])
        return {"healthy_s": healthy, "first_ttft_s": first, "steady_ttft_s": rest}
    except Exception:
        print(Path(log_path).read_text()[-3000:])
        raise
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steady", type=int, default=5)
    parser.add_argument("--vllm", default=str(Path.home() / "peers/vllm/bin/vllm"))
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    kinds = ["ours"] + ([] if args.skip_vllm or not Path(args.vllm).exists() else ["vllm"])
    for r in range(args.repeats):
        for kind in kinds:
            f = one_start(kind, args.vllm, args.steady, timeout=600 if kind == "vllm" else 120)
            print(f"{kind:5s} start {r}: healthy {f['healthy_s']:6.1f} s, first TTFT {1e3 * f['first_ttft_s']:7.1f} ms,"
                  f" steady TTFT {1e3 * f['steady_ttft_s']:6.1f} ms, first/steady "
                  f"{f['first_ttft_s'] / f['steady_ttft_s']:.1f}x; load {machine_load()}", flush=True)


if __name__ == "__main__":
    main()
