"""Offline serving throughput: our engine vs ``transformers`` ``generate`` with static batches, in one run.

    python -m benchmarks.serve_offline [--requests 64] [--max-num-seqs 64] [--hf-batches 32,64] [--threads 1]

The embedded default model, or ``--model DIR``: any checkpoint directory the engine serves (a directory without a
tokenizer gets random token-id prompts; ``--engine-only`` skips ``transformers``, e.g. for a family it has no
``AutoModelForCausalLM`` for or a model too large to run twice; ``--quantization``, ``--attention-backend``,
``--dtype`` pass to the engine). ``--requests`` requests with prompt lengths uniform in [16, ``--max-prompt``
512] and output lengths uniform in [8, ``--max-output`` 256] (fixed seed; prompts are windows of tokenized
standard-library source; EOS ignored so both sides produce exactly the requested tokens). ``transformers``
runs them in arrival order in static batches of each of ``--hf-batches`` (left-padded, generating until the
batch's longest request is done; only requested tokens count); the ratio is taken against the fastest. Then
(unless ``--skip-overhead``) the engine's per-step host overhead (scheduling, input layout, stop checks) as a
fraction of step time over steps that decoded exactly ``--batch`` sequences. One intra-op thread by default: on
a shared 2-core machine, 2 threads make small ops 10x slower.
"""

from __future__ import annotations

import argparse
import inspect
import random
import time
from pathlib import Path

import torch

from benchmarks.common import machine_load
from serve import LLM, SamplingParams
from serve.engine.config import DEFAULT_MODEL


def make_requests(tokenizer, n: int, seed: int, vocab_size: int | None = None, max_prompt: int = 512,
                  max_output: int = 256) -> list[tuple[list[int], int]]:
    """Prompts from tokenized source with a tokenizer, else (``tokenizer`` None) random ids below ``vocab_size``."""
    rng = random.Random(seed)
    source = inspect.getsource(argparse) + inspect.getsource(random)
    corpus = tokenizer.encode(source) if tokenizer is not None else [rng.randrange(vocab_size) for _ in range(8192)]
    requests = []
    for _ in range(n):
        prompt_len, output_len = rng.randint(16, max(16, max_prompt)), rng.randint(8, max(8, max_output))
        start = rng.randrange(0, len(corpus) - prompt_len)
        requests.append((corpus[start:start + prompt_len], output_len))
    return requests


def engine_options(args) -> dict:
    """The engine options of the command line (what every engine of the run gets)."""
    options = {"attention_backend": args.attention_backend, "dtype": args.dtype,
               "async_scheduling": {"auto": None, "on": True, "off": False}[args.async_scheduling]}
    if args.quantization:
        options["quantization"] = args.quantization
    return options


def run_engine(model: str, requests, max_num_seqs: int, **options) -> tuple[float, int, LLM]:
    """A fresh engine each time, so that a repeat gets no prefix-cache hits from the previous one."""
    llm = LLM(model, max_num_seqs=max_num_seqs, **options)
    params = [SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True) for _, out in requests]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))  # warm-up
    llm.engine.stats.__init__()
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.token_ids) for o in outputs)
    assert produced == sum(out for _, out in requests)
    return elapsed, produced, llm


def load_transformers(model_dir: str, pad_id: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=pad_id)
    return model


@torch.inference_mode()
def run_transformers(model, requests, batch: int, pad_id: int) -> tuple[float, int]:
    start, produced = time.perf_counter(), 0
    for i in range(0, len(requests), batch):
        group = requests[i:i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
        steps = max(out for _, out in group)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=pad_id)
        assert out.shape[1] == width + steps
        produced += sum(n for _, n in group)  # what the requests asked for; the padding steps are waste
    return time.perf_counter() - start, produced


def compare(args, requests, pad_id: int) -> None:
    """Alternate engine and transformers runs ``--repeats`` times; the best time of each counts (a shared
    machine's load changes from minute to minute)."""
    hf_model = None if args.engine_only else load_transformers(args.model, pad_id)
    batches = [] if args.engine_only else [int(b) for b in args.hf_batches.split(",")]
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        seconds, tokens, llm = run_engine(args.model, requests, args.max_num_seqs, **engine_options(args))
        best["engine"] = max(best.get("engine", 0.0), tokens / seconds)
        for batch in batches:
            hf_s, hf_tokens = run_transformers(hf_model, requests, batch, pad_id)
            best[f"hf{batch}"] = max(best.get(f"hf{batch}", 0.0), hf_tokens / hf_s)
    st = llm.engine.stats
    print(f"engine:       {best['engine']:8.1f} output tok/s  (max_num_seqs {args.max_num_seqs}, {st.steps} steps, "
          f"{st.prompt_tokens} prompt tokens computed, {llm.engine.scheduler.num_preemptions} preemptions)")
    for batch in batches:
        print(f"transformers: {best[f'hf{batch}']:8.1f} output tok/s  (static batches of {batch})")
    if not batches:
        return
    hf_best = max(best[f"hf{b}"] for b in batches)
    print(f"throughput ratio (engine / best transformers): {best['engine'] / hf_best:.2f}x  (target >= 3x)")


def overhead_at_batch(llm: LLM, requests, batch: int) -> tuple[float, float, float, int]:
    """Host overhead and mean step time over steps with exactly ``batch`` running, decoding sequences. Overhead:
    the share of the steps' wall time in which no forward pass or sampling ran (scheduling, input layout, stop
    checks and outputs, and the Python loop around them). With overlapped steps (``async_scheduling``, the CPU
    default with a core to spare) the forward time is what the C step measured on its own thread, so host work
    done meanwhile does not count: only what the forward waited for. Also returned: the share in which no forward
    pass ran (the sampling too counted as idle)."""
    engine, stats = llm.engine, llm.engine.stats
    for i, (prompt, _) in enumerate(requests[:batch]):
        engine.add_request(f"o{i}", prompt[:64], SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True))
    calls = []  # per step() call: whether all ``batch`` decoded, its wall time, and the forward and sampling time
    # it added; overlapped, a call adds the previous call's step (it waits for that one), so a call is paired
    # with the next call's figures
    while engine.has_unfinished_requests():
        decoding = len(engine.scheduler.running) == batch and all(
            s.num_tokens - s.num_computed == 1 for s in engine.scheduler.running)
        model, sample, t0 = stats.model_s, stats.sample_s, time.perf_counter()
        engine.step()
        calls.append((decoding, time.perf_counter() - t0, stats.model_s - model, stats.sample_s - sample))
    shift = 1 if engine.overlap else 0
    paired = [(wall, *calls[k + shift][2:]) for k, (decoding, wall, _, _) in enumerate(calls[:len(calls) - shift])
              if decoding]
    wall, forward, sampling = (sum(column) for column in zip(*paired, strict=True))
    steps = len(paired)
    device = forward + sampling
    return 1 - device / wall, 1 - forward / wall, wall / max(steps, 1), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="static batch of transformers; overhead batch")
    parser.add_argument("--hf-batches", default="32,64", help="static batch sizes tried for transformers")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the engine's running-sequence limit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="engine and transformers runs alternated; best of each")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a checkpoint directory")
    parser.add_argument("--engine-only", action="store_true", help="skip transformers (no comparison)")
    parser.add_argument("--quantization", default=None, help="engine quantization, e.g. fp8-block")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                        help="overlapped steps (auto: the engine's default)")
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--skip-overhead", action="store_true", help="skip the per-step overhead measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from serve.models.loader import read_config  # the vocabulary, without building a model

    tokenizer = LLM(args.model, num_kv_blocks=128).tokenizer if (Path(args.model) / "tokenizer.json").is_file() \
        else None
    vocab = read_config(args.model)[2].vocab_size
    requests = make_requests(tokenizer, args.requests, args.seed, vocab, args.max_prompt, args.max_output)
    pad_id = tokenizer.hf.token_to_id("<|endoftext|>") if tokenizer is not None else 0
    if pad_id is None:
        pad_id = 0
    print(f"{len(requests)} requests: {sum(len(p) for p, _ in requests)} prompt tokens, "
          f"{sum(o for _, o in requests)} output tokens; threads={args.threads}")
    compare(args, requests, pad_id)
    if args.skip_overhead:
        return
    llm = LLM(args.model, max_num_seqs=args.batch, **engine_options(args))
    fraction, idle, step_s, steps = overhead_at_batch(llm, requests, args.batch)
    print(f"per-step host overhead at batch {args.batch}: {100 * fraction:.1f}% of {1e3 * step_s:.2f} ms/step "
          f"over {steps} steps (target <= 5%); no forward pass running (sampling included): {100 * idle:.1f}%; "
          f"overlapped steps: {llm.engine.overlap}; load {machine_load()}")


if __name__ == "__main__":
    main()
