"""Our engine against llama.cpp on the same machine, same threads, same token-id workloads, interleaved.

    bash benchmarks/peers/install_llamacpp.sh                                   # once: ~/peers/llamacpp
    ~/peers/llamacpp/venv/bin/python benchmarks/peers/llamacpp_convert.py       # once: the GGUF files
    python -m benchmarks.peers.llamacpp_bench [--threads 1,2] [--repeats 3] [--models default,mixtral] [--tools]

Two models: ``default`` (``serve/default_model``, a tiny Qwen3-MoE; llama.cpp's ``qwen3moe``) and ``mixtral`` (a
random 4-layer Mixtral of ``llamacpp_convert.py``, hidden 1024, 8 experts of 1536, top-2), f32 weights and f32 KV
cache on both sides. Workloads, greedy, EOS ignored, prompts cut from tokenized standard-library source:

- ``decode``: one 128-token prompt, 128 tokens; decode tok/s over the 127 tokens after the first;
- ``pp512``: one 512-token prompt, one token; prefill tok/s (prompt tokens over the time to the first token);
- ``batchN`` (N = 8, 32, 64): N prompts of ``--batch-prompt`` 32 tokens, ``--batch-output`` 64 tokens each;
  output tok/s over the whole call (prefill included), ours through the engine's continuous batching.

llama.cpp runs in its own venv's Python (``llamacpp_worker.py``: the C API through llama-cpp-python, model loaded
once, a fresh context per job), stopped (SIGSTOP) during our turns; ours is one engine per model (prefix caching
off, so repeats get no cache hits) in this process, idle during theirs. Turns alternate ``--repeats`` times per
workload, who goes first swapping each turn; the best of each side counts. Printed per turn: load average, both
rates, CPU seconds; then per workload ours, theirs, the ratio and how many output tokens agree (per sequence,
identical up to the first divergence). ``--tools`` adds llama.cpp's own ``llama-bench`` (pp512, tg128) and
``llama-batched-bench`` figures for reference. Our OpenMP threads wait passively (``benchmarks`` sets
``OMP_WAIT_POLICY=PASSIVE``); llama.cpp's get their default (the variable unset) unless ``--their-omp``. Its KV
cache is split per sequence (its default; ``--their-kv unified``: one pool, where each sequence's attention spans
every cell, 1.1x slower at 32 sequences here, 2x at 64). On a loaded 2-core machine, llama.cpp at 2 threads with
its default spinning can collapse (8 tok/s against 158 in the next turn, with 9x its CPU seconds): read the CPU-s.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_load
from serve import LLM, SamplingParams
from serve.engine.config import DEFAULT_MODEL

PEER = Path.home() / "peers/llamacpp"


def peer_env(policy: str) -> dict:
    """llama.cpp's environment: ours less the OMP_WAIT_POLICY that `benchmarks` set for us, unless asked."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return env if policy == "unset" else env | {"OMP_WAIT_POLICY": policy}


def workloads(args) -> list[tuple[str, int, int, int]]:
    """(name, prompt tokens, output tokens, sequences)."""
    batched = [(f"batch{n}", args.batch_prompt, args.batch_output, n) for n in map(int, args.batches.split(","))]
    return [("decode", 128, 128, 1), ("pp512", 512, 1, 1)] + batched


def make_prompts(tokenizer, length: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    corpus = tokenizer.encode(inspect.getsource(argparse) + inspect.getsource(random))
    return [corpus[s:s + length] for s in (rng.randrange(len(corpus) - length) for _ in range(n))]


def rate(name: str, result: dict, prompts: list[list[int]], max_tokens: int) -> float:
    if name == "pp512":
        return len(prompts[0]) / result["first_s"]
    if name == "decode":
        return (max_tokens - 1) / (result["seconds"] - result["first_s"])
    return len(prompts) * max_tokens / result["seconds"]


class Ours:
    """One engine for all workloads of a model: prefix caching off, KV blocks for the largest workload."""

    def __init__(self, model: str, jobs) -> None:
        blocks = max(len(prompts) * -(-(len(prompts[0]) + max_tokens) // 16) for _, prompts, max_tokens in jobs)
        self.llm = LLM(model, max_num_seqs=max(len(p) for _, p, _ in jobs), enable_prefix_caching=False,
                       max_model_len=max(len(p[0]) + t for _, p, t in jobs), num_kv_blocks=blocks + 16)
        self.llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
        self.ids = 0

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        engine, params = self.llm.engine, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids = [f"bench-{self.ids + i}" for i in range(len(prompts))]
        self.ids += len(prompts)
        tokens: dict[str, list[int]] = {}
        started: set[str] = set()
        first_s = None
        cpu0, t0 = time.process_time(), time.perf_counter()
        for rid, prompt in zip(ids, prompts, strict=True):
            engine.add_request(rid, prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                started.add(out.request_id)
                if out.finished:
                    tokens[out.request_id] = list(out.token_ids)
            if first_s is None and len(started) == len(ids):
                first_s = time.perf_counter() - t0
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return {"first_s": first_s, "seconds": seconds, "cpu_s": cpu, "tokens": [tokens[r] for r in ids]}


class Theirs:
    """``llamacpp_worker.py`` in the peer's Python: one model loaded, a job per stdin line."""

    def __init__(self, python: str, gguf: Path, log, env: dict) -> None:
        self.proc = subprocess.Popen([python, str(Path(__file__).with_name("llamacpp_worker.py")), str(gguf)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                     start_new_session=True)
        self.ready = self.result()

    def result(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise RuntimeError(f"the llama.cpp worker exited ({self.proc.wait()}) without a result; see its log")

    def run(self, prompts: list[list[int]], max_tokens: int, threads: int, kv_unified: bool) -> dict:
        job = {"prompts": prompts, "max_tokens": max_tokens, "threads": threads, "kv_unified": kv_unified}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self.result()

    def pause(self, stopped: bool) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP if stopped else signal.SIGCONT)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, int, int]:
    """(tokens identical up to each sequence's first divergence, all tokens, fully identical sequences)."""
    same = 0
    for a, b in zip(ours, theirs, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same += n
    return same, sum(map(len, ours)), sum(a == b for a, b in zip(ours, theirs, strict=True))


def compare(ours: Ours, theirs: Theirs, name: str, prompts, max_tokens: int, threads: int, args) -> dict:
    best = {"ours": 0.0, "llama.cpp": 0.0}
    for turn in range(args.repeats):
        results = {}
        for side in (("ours", "llama.cpp") if turn % 2 == 0 else ("llama.cpp", "ours")):
            if side == "ours":
                theirs.pause(True)  # nothing of theirs may run in our turn
                try:
                    results[side] = ours.run(prompts, max_tokens)
                finally:
                    theirs.pause(False)
            else:
                results[side] = theirs.run(prompts, max_tokens, threads, args.their_kv == "unified")
        rates = {side: rate(name, r, prompts, max_tokens) for side, r in results.items()}
        for side, r in rates.items():
            best[side] = max(best[side], r)
        print(f"    turn {turn}: load {machine_load()}; ours {rates['ours']:8.1f} tok/s "
              f"({results['ours']['cpu_s']:.2f} CPU-s), llama.cpp {rates['llama.cpp']:8.1f} tok/s "
              f"({results['llama.cpp']['cpu_s']:.2f} CPU-s)", flush=True)
    same, total, identical = agreement(results["ours"]["tokens"], results["llama.cpp"]["tokens"])
    return best | {"same": same, "total": total, "identical": identical, "seqs": len(prompts)}


def run_tools(gguf: Path, threads: int, args) -> None:
    """llama.cpp's own benchmarks, for reference (not interleaved; they load the model each time)."""
    bin_dir = Path(args.peer) / "build" / "bin"
    common = ["-m", str(gguf), "-t", str(threads)]
    env = peer_env(args.their_omp)
    bench = subprocess.run([str(bin_dir / "llama-bench"), *common, "-p", "512", "-n", "128", "-r",
                            str(args.repeats), "-o", "json"], capture_output=True, text=True, env=env)
    for row in json.loads(bench.stdout or "[]"):
        test = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        print(f"    llama-bench {test} (f16 KV: it takes no f32): {row['avg_ts']:.1f} +- {row['stddev_ts']:.1f} "
              f"tok/s; load {machine_load()}")
    npl = args.batches
    ctx = max(map(int, npl.split(","))) * (args.batch_prompt + args.batch_output)
    batched = subprocess.run([str(bin_dir / "llama-batched-bench"), *common, "-ctk", "f32", "-ctv", "f32",
                              "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(args.batch_prompt),
                              "-ntg", str(args.batch_output), "-npl", npl, "--output-format", "jsonl"],
                             capture_output=True, text=True, env=env)
    for line in batched.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            print(f"    llama-batched-bench npl {row['pl']}: {row['pl'] * row['tg'] / row['t']:.1f} output tok/s "
                  f"over the whole run (decode alone {row['speed_tg']:.1f}); load {machine_load()}")
    if bench.returncode or batched.returncode:
        print(f"    (tools exited {bench.returncode}/{batched.returncode}: {(bench.stderr + batched.stderr)[-400:]})")


def bench_model(model: str, ckpt: str, gguf: Path, jobs, args, log_path: Path) -> list[tuple]:
    """Every workload at every thread count on one model: ours and theirs loaded once each."""
    rows = []
    ours = Ours(ckpt, jobs)
    with open(log_path, "a") as log:
        theirs = Theirs(str(Path(args.peer) / "venv/bin/python"), gguf, log, peer_env(args.their_omp))
        print(f"{model}: llama.cpp {theirs.ready['system']}", flush=True)
        try:
            for threads in map(int, args.threads.split(",")):
                torch.set_num_threads(threads)
                for name, prompts, max_tokens in jobs:
                    print(f"  {model} threads={threads} {name}:", flush=True)
                    rows.append((model, threads, name,
                                 compare(ours, theirs, name, prompts, max_tokens, threads, args)))
                if args.tools:
                    theirs.pause(True)
                    try:
                        run_tools(gguf, threads, args)
                    finally:
                        theirs.pause(False)
        finally:
            theirs.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts, the same for both sides")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="default,mixtral")
    parser.add_argument("--batches", default="8,32,64")
    parser.add_argument("--batch-prompt", type=int, default=32)
    parser.add_argument("--batch-output", type=int, default=64)
    parser.add_argument("--peer", default=str(PEER), help="install_llamacpp.sh's folder")
    parser.add_argument("--tools", action="store_true", help="also llama-bench and llama-batched-bench")
    parser.add_argument("--their-omp", default="unset", choices=("unset", "PASSIVE", "ACTIVE"),
                        help="OMP_WAIT_POLICY for llama.cpp (unset: its default, as a user runs it)")
    parser.add_argument("--their-kv", default="split", choices=("split", "unified"),
                        help="llama.cpp's KV cache: per sequence (its default) or one unified pool")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models_dir = Path(args.peer) / "models"
    checkpoints = {"default": (str(DEFAULT_MODEL), models_dir / "default.gguf"),
                   "mixtral": (str(models_dir / "mixtral"), models_dir / "mixtral.gguf")}
    tokenizer = LLM(str(DEFAULT_MODEL), num_kv_blocks=128).tokenizer  # the mixtral checkpoint has the same one
    jobs = [(name, make_prompts(tokenizer, p, n, args.seed + i), t)
            for i, (name, p, t, n) in enumerate(workloads(args))]
    tmp = Path(tempfile.mkdtemp(prefix="llamacpp-peer-"))
    summary = []
    print(f"llama.cpp worker log: {tmp / 'llamacpp.log'}; load {machine_load()}; OMP_WAIT_POLICY ours "
          f"{os.environ.get('OMP_WAIT_POLICY')}, theirs {args.their_omp}; their KV cache {args.their_kv}", flush=True)
    for model in args.models.split(","):
        summary += bench_model(model, *checkpoints[model], jobs, args, tmp / "llamacpp.log")
    print(f"\nbest of {args.repeats} (tok/s), load {machine_load()}:")
    print(f"{'model':8} {'thr':>3} {'workload':9} {'ours':>9} {'llama.cpp':>9} {'ratio':>6}  agreement")
    for model, threads, name, r in summary:
        print(f"{model:8} {threads:3d} {name:9} {r['ours']:9.1f} {r['llama.cpp']:9.1f} "
              f"{r['ours'] / r['llama.cpp']:5.2f}x  {r['same']}/{r['total']} tokens before divergence, "
              f"{r['identical']}/{r['seqs']} sequences identical")


if __name__ == "__main__":
    main()
