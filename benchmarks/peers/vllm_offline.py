"""The offline workload of :mod:`benchmarks.serve_offline` on our engine and on vLLM's CPU build, interleaved.

    bash benchmarks/peers/install_vllm.sh          # once: ~/peers/vllm
    python -m benchmarks.peers.vllm_offline [--repeats 3] [--threads 1] [--vllm-python ~/peers/vllm/bin/python]

The same 64 token-id requests (greedy, EOS ignored) alternate between ours and vLLM ``--repeats`` times: vLLM
loads once in its own process (``vllm_worker.py``) and generates on each turn; ours builds a fresh engine per
turn (no prefix-cache carry-over; vLLM's cache is reset), with vLLM's processes stopped (SIGSTOP) meanwhile: its
idle engine core keeps a core busy, which would load our turns only. Printed per turn: machine load, output tok/s, CPU
seconds (ours: this process; vLLM: its process and its engine-core child); then the best of each, their ratio,
and how many requests produced token-identical outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_load
from benchmarks.serve_offline import make_requests
from serve import LLM, SamplingParams
from serve.engine.config import DEFAULT_MODEL


def run_ours(model: str, requests, max_num_seqs: int) -> dict:
    """A fresh engine (no prefix-cache carry-over), warmed up, then the requests: wall and CPU seconds, tokens."""
    llm = LLM(model, max_num_seqs=max_num_seqs)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests]
    cpu0, t0 = time.process_time(), time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"seconds": seconds, "cpu_s": cpu, "tokens": [list(o.token_ids) for o in outputs]}


def read_result(worker: subprocess.Popen) -> dict:
    for line in worker.stdout:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"the vLLM worker exited ({worker.wait()}) without a result; see its log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="our intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-python", default=str(Path.home() / "peers/vllm/bin/python"))
    parser.add_argument("--vllm-memory", type=float, default=0.3,
                        help="vLLM's gpu_memory_utilization: on its CPU backend, the share of memory it reserves")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    requests = make_requests(LLM(args.model, num_kv_blocks=128).tokenizer, args.requests, args.seed)
    print(f"{len(requests)} requests: {sum(len(p) for p, _ in requests)} prompt tokens, "
          f"{sum(n for _, n in requests)} output tokens; our threads={args.threads}; load {machine_load()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vllm-peer-"))
    (tmp / "requests.json").write_text(json.dumps(requests))
    with open(tmp / "vllm.log", "w") as log:
        t0 = time.perf_counter()
        worker = subprocess.Popen([args.vllm_python, str(Path(__file__).with_name("vllm_worker.py")),
                                   str(tmp / "requests.json"), args.model, str(args.max_num_seqs),
                                   str(args.vllm_memory)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                  start_new_session=True)
        best = {"ours": 0.0, "vllm": 0.0}
        try:
            read_result(worker)
            print(f"vLLM ready after {time.perf_counter() - t0:.0f} s (its log: {tmp / 'vllm.log'})", flush=True)
            agree = 0
            for turn in range(args.repeats):
                os.killpg(worker.pid, signal.SIGSTOP)  # vLLM's idle engine core keeps a core busy: pause it
                try:
                    ours = run_ours(args.model, requests, args.max_num_seqs)
                finally:
                    os.killpg(worker.pid, signal.SIGCONT)
                worker.stdin.write("run\n")
                worker.stdin.flush()
                theirs = read_result(worker)
                rates = {name: sum(map(len, r["tokens"])) / r["seconds"]
                         for name, r in (("ours", ours), ("vllm", theirs))}
                for name, rate in rates.items():
                    best[name] = max(best[name], rate)
                agree = sum(a == b for a, b in zip(ours["tokens"], theirs["tokens"], strict=True))
                print(f"turn {turn}: load {machine_load()}; "
                      f"ours {rates['ours']:7.1f} tok/s ({ours['cpu_s']:.1f} CPU-s), "
                      f"vLLM {rates['vllm']:7.1f} tok/s ({theirs['cpu_s']:.1f} CPU-s); identical outputs "
                      f"{agree}/{len(requests)}", flush=True)
        finally:
            worker.stdin.close()
            worker.wait(timeout=120)
    print(f"best of {args.repeats}: ours {best['ours']:.1f} tok/s, vLLM {best['vllm']:.1f} tok/s: ratio "
          f"{best['ours'] / best['vllm']:.2f}x; identical outputs {agree}/{len(requests)}; load {machine_load()}")


if __name__ == "__main__":
    main()
