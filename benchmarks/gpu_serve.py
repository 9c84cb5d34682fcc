"""The serving engine's one prepared device check: every figure, and every ratio, measured in this run.

    python -m benchmarks.gpu_serve [--sections parity offline decode pytest kernels] [--json PATH]
    python -m benchmarks.gpu_serve --cpu-smoke    # the same code paths on the CPU with tiny shapes

Sections, each independent (a failure prints one line and the next one runs; the exit code is 1 if any failed
or was skipped for want of ``--budget-s`` time, 420 s by default; subprocesses get at most what is left of it):

- **parity**: greedy tokens of ``serve.LLM`` vs ``transformers`` ``generate`` on the same device, for the tiny
  checkpoints of ``tests/serve/checkpoints.py``. fp32 must be identical. bf16 reports identical tokens, and is
  judged by the fp32-argmax rate: the share of generated tokens that the fp32 model, fed the same context, ranks
  first (token identity is no bf16 test: one rounding flips a routing choice, and every later token differs).
- **offline**: the requests of ``benchmarks/serve_offline.py`` on a random Mixtral-shaped bf16 checkpoint: ours
  eager (``cuda_graphs=False``), ours with CUDA graphs, ``transformers`` in static batches (left-padded, greedy,
  each batch generating until its longest request is done); each after a warm-up workload.
- **decode**: ``runner.forward`` of one decode step at batch 1, 8, 64 (CUDA events, L2 flushed, median), with and
  without CUDA graphs, against the HBM roofline = bytes the step must read / bandwidth. Bytes: every weight but
  the routed experts and the embedding table (B rows of it) + the routed experts (upper bound: all E per layer;
  expected: E * (1 - (1 - K/E)^B) distinct ones under uniform top-K routing) + the KV cache read. Bandwidth: a
  1 GiB device-to-device copy measured here (bytes read + written), next to the GPU's datasheet figure.
- **pytest**: ``pytest -m "gpu and not slow"`` in a subprocess.
- **kernels**: the rows of ``benchmarks/gpu_moe.py`` and ``benchmarks/gpu_fp8.py`` with small settings.

Targets (H100): ours with graphs >= 3x the best transformers static batch; decode at batch 64 with graphs >= 50%
of the roofline. ``--cpu-smoke``: the CPU, no graphs, roofline or kernel rows ("skipped: no CUDA").
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch

from benchmarks.common import interleaved_medians
from benchmarks.serve_offline import make_requests
from serve import LLM, SamplingParams
from serve.engine.config import DEFAULT_MODEL
from serve.engine.tokenizer import Tokenizer
from serve.models.attention import PagedKVCache

DATASHEET_TBPS = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35}  # HBM; the first match wins
PARITY_TOKENS = 32
KERNEL_ROWS = [  # small settings: two models, three token counts, the default tile table
    ["benchmarks.gpu_moe", "--models", "mixtral", "qwen3", "--tokens", "1", "64", "4096", "--graph-tokens", "1",
     "64", "--check-tokens", "64", "--reps", "10", "--warmup", "2", "--no-autotune"],
    ["benchmarks.gpu_fp8", "--models", "mixtral", "qwen3", "--tokens", "1", "64", "4096", "--check-tokens", "64",
     "--reps", "10", "--warmup", "2"],
]


@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    tmp: Path
    deadline: float
    summary: list[str] = field(default_factory=list)  # printed again at the end
    errors: list[str] = field(default_factory=list)  # of parts that failed while their section went on
    tracebacks: dict[str, str] = field(default_factory=dict)  # written to --json
    mixtral_path: str | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def figure(self, text: str, summary: bool = True) -> None:
        print(f"  {text}", flush=True)
        if summary:
            self.summary.append(text)

    def attempt(self, label: str, fn):
        """``fn()``, or None after printing a one-line error (the section goes on, and fails at its end)."""
        try:
            return fn()
        except Exception as err:
            self.errors.append(f"{label}: {one_line(err)}")
            self.tracebacks[label] = traceback.format_exc()
            self.figure(self.errors[-1])
            return None

    def options(self, **options) -> dict:
        return dict(device=str(self.device), **options)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- parity


def parity_prompts(seed: int = 1) -> list[list[int]]:
    """Mixed lengths for the tiny checkpoints (vocabulary 128); the last shares the 4th's 40 tokens."""
    g = torch.Generator().manual_seed(seed)
    own = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 64, 100)]
    return own[:5] + [own[3] + own[1]]


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """``transformers`` greedy tokens, one prompt at a time (no padding), on the model's device."""
    device, out = next(model.parameters()).device, []
    for p in prompts:
        ids = model.generate(torch.tensor([p], device=device), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


@torch.inference_mode()
def fp32_argmax_rate(model32, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Share of the generated tokens that ``model32`` ranks first given the same context (teacher-forced)."""
    device, hits = next(model32.parameters()).device, 0
    for p, g in zip(prompts, outputs, strict=True):
        logits = model32(torch.tensor([p + g], device=device)).logits[0, len(p) - 1:-1]
        hits += int((logits.argmax(-1).cpu() == torch.tensor(g)).sum())
    return hits / sum(map(len, outputs))


def bf16_faithful(ours: float, theirs: float) -> bool:
    """The bf16 verdict on fp32-argmax rates: ours within 5 points of transformers' bf16 (~10 of 192 tokens; on the
    CPU the two differ by up to 3) and at least 85% (92-99% measured on the CPU)."""
    return ours >= max(theirs - 0.05, 0.85)


def identical(got: list[list[int]], expected: list[list[int]]) -> int:
    return sum(a == b for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True))


def parity(run: Run) -> bool:
    from tests.serve.checkpoints import FAMILIES, hf_model, save

    prompts, greedy = parity_prompts(), SamplingParams(max_tokens=PARITY_TOKENS, temperature=0.0, ignore_eos=True)
    total, failed = PARITY_TOKENS * len(prompts), []
    for family in FAMILIES:
        model32 = hf_model(family)
        path = save(model32, run.tmp / family)
        model32 = model32.to(run.device)
        for dtype in ("float32", "bfloat16"):
            ref = model32 if dtype == "float32" else copy.deepcopy(model32).to(torch.bfloat16)
            expected = hf_greedy(ref, prompts, PARITY_TOKENS)
            llm = LLM(path, dtype=dtype, num_kv_blocks=64, max_model_len=256, max_num_seqs=8, **run.options())
            got = [o.token_ids for o in llm.generate(prompts, greedy)]
            text = f"{family:22} {dtype:8} identical {identical(got, expected):3d}/{total}"
            if dtype == "float32":
                good = got == expected
            else:
                ours, theirs = fp32_argmax_rate(model32, prompts, got), fp32_argmax_rate(model32, prompts, expected)
                good = bf16_faithful(ours, theirs)
                text += f"  fp32-argmax rate ours {100 * ours:5.1f}% vs transformers {100 * theirs:5.1f}%"
            run.figure(f"{text}  {'ok' if good else 'FAIL'}", summary=not good)
            failed += [] if good else [f"{family} {dtype}"]
            del llm, ref
    run.figure(f"parity (fp32 identical; bf16 rate >= transformers' - 5 and >= 85%): "
               f"{'all ok' if not failed else 'FAIL ' + ', '.join(failed)}")
    return not failed


# ---------------------------------------------------------------------------------------------- offline


def mixtral_checkpoint(run: Run) -> str:
    """A random Mixtral-shaped bf16 checkpoint, built on the device and saved once per run."""
    if run.mixtral_path is None:
        import transformers as tf

        a, start = run.args, time.perf_counter()
        config = tf.MixtralConfig(
            vocab_size=4096, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
            num_attention_heads=a.hidden // a.head_dim, num_key_value_heads=max(1, a.hidden // a.head_dim // 4),
            head_dim=a.head_dim, num_local_experts=a.experts, num_experts_per_tok=a.top_k, max_position_embeddings=1024,
            bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
        with torch.device(run.device):
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(run.tmp / "mixtral"))
        run.figure(f"mixtral checkpoint: D={a.hidden} F={a.ffn} L={a.layers} E={a.experts} K={a.top_k}, "
                   f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params bf16, "
                   f"built in {time.perf_counter() - start:.1f} s")
        run.mixtral_path = str(run.tmp / "mixtral")
    return run.mixtral_path


def engine_throughput(run: Run, requests, warmup, options: dict) -> float:
    """Output tok/s of one engine over ``requests``, after it has served ``warmup`` (compiled, autotuned)."""
    llm = LLM(mixtral_checkpoint(run), dtype="bfloat16", max_num_seqs=run.args.max_num_seqs, max_model_len=1024,
              num_kv_blocks=run.args.max_num_seqs * 64 + 64, **options)
    for reqs in (warmup, requests):
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs]
        start = time.perf_counter()
        outputs = llm.generate([p for p, _ in reqs], params)
        synchronize(run.device)
        elapsed = time.perf_counter() - start
    assert sum(len(o.token_ids) for o in outputs) == sum(n for _, n in requests)
    return sum(n for _, n in requests) / elapsed


@torch.inference_mode()
def hf_static_batches(model, requests, batch: int, pad_id: int) -> float:
    """Output tok/s of ``transformers`` in static left-padded batches (``serve_offline.run_transformers`` with the
    inputs on the model's device); only the requested tokens count."""
    device, start = next(model.parameters()).device, time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i:i + batch]
        width, steps = max(len(p) for p, _ in group), max(n for _, n in group)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group], device=device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=pad_id)
        assert out.shape[1] == width + steps
    synchronize(device)
    return sum(n for _, n in requests) / (time.perf_counter() - start)


def transformers_rate(run: Run, requests, warmup, pad_id: int) -> float:
    """The best output tok/s of ``transformers`` over the static batch sizes of ``--hf-batches``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mixtral_checkpoint(run), dtype=torch.bfloat16).to(run.device).eval()
    rates = []
    for batch in (int(b) for b in run.args.hf_batches.split(",")):
        hf_static_batches(model, warmup[:batch], batch, pad_id)
        rates.append(hf_static_batches(model, requests, batch, pad_id))
        run.figure(f"transformers b{batch:<3} {rates[-1]:9.1f} output tok/s (static batches)")
    return max(rates)


def offline(run: Run) -> bool:
    tokenizer = Tokenizer(DEFAULT_MODEL)
    pad_id = tokenizer.hf.token_to_id("<|endoftext|>")
    requests = make_requests(tokenizer, run.args.requests, run.args.seed)
    warmup = [(p, min(n, 16)) for p, n in make_requests(tokenizer, run.args.requests, run.args.seed + 1)]
    if not run.cuda:  # the CPU smoke: short prompts and outputs
        requests, warmup = ([(p[:48], min(n, 24)) for p, n in reqs] for reqs in (requests, warmup))
    print(f"  {len(requests)} requests: {sum(len(p) for p, _ in requests)} prompt tokens, "
          f"{sum(n for _, n in requests)} output tokens", flush=True)
    rates = {}
    for name, graphs in (("ours eager", False), ("ours graphs", True)):
        if graphs and not run.cuda:
            print("  ours graphs: skipped: no CUDA", flush=True)
        else:
            options = run.options(cuda_graphs=graphs)
            rate = run.attempt(name, lambda: engine_throughput(run, requests, warmup, options))
            if rate is not None:
                rates[name] = rate
                run.figure(f"{name:16} {rate:9.1f} output tok/s")
        gc.collect()
    hf = run.attempt("transformers", lambda: transformers_rate(run, requests, warmup, pad_id))
    for name, rate in rates.items() if hf else ():
        verdict = f"  (target >= 3x: {'ok' if rate >= 3 * hf else 'MISS'})" if "graphs" in name else ""
        run.figure(f"{name} / best transformers: {rate / hf:.2f}x{verdict}")
    if "ours graphs" in rates and "ours eager" in rates:
        run.figure(f"ours graphs / ours eager: {rates['ours graphs'] / rates['ours eager']:.2f}x")
    return True


# ---------------------------------------------------------------------------------------------- decode


def step_bytes(model, batch: int, context_tokens: int, kv_bytes_per_token: int) -> tuple[float, float]:
    """Bytes a decode step of ``batch`` sequences reads, (upper bound: every routed expert, expected: the distinct
    ones under uniform top-K): non-expert weights + routed experts + the KV cache over ``context_tokens``."""
    from moe.experts import Experts
    from quant import Fp8Experts

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    experts = {id(t): t for m in model.modules() if isinstance(m, (Experts, Fp8Experts))
               for t in (*m.parameters(), *m.buffers())}
    dense = sum(nbytes(p) for p in model.parameters() if id(p) not in experts)
    embed = model.embed_tokens.weight
    if embed is not model.lm_head.weight:  # the lookup reads only the step's rows
        dense -= nbytes(embed) - batch * embed.shape[1] * embed.element_size()
    expert_bytes, kv = sum(map(nbytes, experts.values())), context_tokens * kv_bytes_per_token
    E, K = model.config.num_experts, model.config.top_k
    return dense + expert_bytes + kv, dense + expert_bytes * (1 - (1 - K / E) ** batch) + kv


def scheduled_decode(engine, batch: int, warmup_steps: int = 3):
    """Step ``engine`` until its ``batch`` running sequences all decode, then ``warmup_steps`` more (this batch's
    shapes autotuned, compiled, replayed), then schedule one decode step of all of them without running it:
    returns ``(inputs, copies, seqs)`` for ``engine.runner.forward(inputs, copies)``."""
    for _ in range(10_000):
        running = engine.scheduler.running
        if len(running) == batch and all(s.num_tokens - s.num_computed == 1 for s in running):
            break
        engine.step()
    else:
        raise RuntimeError(f"batch {batch}: the sequences never all reached decoding")
    for _ in range(warmup_steps):
        engine.step()
    step = engine.scheduler.schedule()  # allocates the slots of the step's tokens, as engine.step does
    if len(step.seqs) != batch or set(step.num_new_tokens) != {1}:
        raise RuntimeError(f"batch {batch}: scheduled {step.num_new_tokens}, not a decode step of all")
    return engine.runner.prepare(step.seqs, step.num_new_tokens), engine.blocks.take_copies(), step.seqs


def decode_step_time(llm: LLM, batch: int, timer, context: int = 256) -> tuple[float, int]:
    """Seconds of ``runner.forward`` for a decode step of ``batch`` sequences of ~``context`` tokens (its host work,
    host-to-device copies and graph padding included), and their total context."""
    engine, g = llm.engine, torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(0, engine.model.config.vocab_size, (context + i % 7,), generator=g).tolist()
        engine.add_request(f"decode-{batch}-{i}", prompt, SamplingParams(max_tokens=512, temperature=0.0,
                                                                         ignore_eos=True))
    inputs, copies, seqs = scheduled_decode(engine, batch)
    seconds = timer(lambda: engine.runner.forward(inputs, copies))  # each rerun rewrites the same K/V slots
    for s in seqs:
        engine.abort(s.request_id)
    return seconds, sum(s.num_tokens for s in seqs)


def decode_times(run: Run, options: dict, timer, times: dict, reads: dict) -> None:
    batches, graphs = run.args.decode_batches, options.get("cuda_graphs", False)
    llm = LLM(mixtral_checkpoint(run), dtype="bfloat16", max_num_seqs=max(batches), max_model_len=1024,
              num_kv_blocks=max(batches) * 64 + 64, async_scheduling=False, **options)  # steps timed by hand
    kv_per_token = PagedKVCache.bytes_per_block(llm.engine.model.config, 1, torch.bfloat16)
    for b in batches:
        times[graphs, b], context = decode_step_time(llm, b, timer)
        reads[b] = step_bytes(llm.engine.model, b, context, kv_per_token)


def decode(run: Run) -> bool:
    batches, bandwidth, sheet = run.args.decode_batches, None, None
    if run.cuda:
        from benchmarks.gpu_moe import Timer, copy_bandwidth

        timer = Timer(reps=run.args.reps, warmup=3, flush=True)
        bandwidth, name = copy_bandwidth(timer), torch.cuda.get_device_name(run.device)
        sheet = next((tbps * 1e12 for key, tbps in DATASHEET_TBPS.items() if key in name), None)
        run.figure(f"HBM: d2d copy {bandwidth / 1e12:.2f} TB/s measured here; datasheet ({name}) "
                   + (f"{sheet / 1e12:.2f} TB/s" if sheet else "unknown"))
    else:
        timer = lambda fn: interleaved_medians({"step": fn}, reps=run.args.reps, warmup=2)["step"]  # noqa: E731
        print("  roofline and bandwidth: skipped: no CUDA", flush=True)
    times, reads = {}, {}
    for graphs in (False, True):
        if graphs and not run.cuda:
            print("  decode with graphs: skipped: no CUDA", flush=True)
        else:
            options = run.options(cuda_graphs=graphs)
            run.attempt(f"decode graphs={graphs}", lambda: decode_times(run, options, timer, times, reads))
            gc.collect()
    ms = lambda t: f"{1e3 * t:9.3f}" if t else f"{'-':>9}"  # noqa: E731
    run.figure(f"{'batch':>5} {'eager ms':>9} {'graphs ms':>9} {'MB all':>8} {'MB expect':>9} {'roof ms all':>11} "
               f"{'expect':>8} {'%roof eager':>11} {'graphs':>7} {'%sheet graphs':>13}")
    for b in (b for b in batches if b in reads):
        (upper, expected), eager, graphs = reads[b], times.get((False, b)), times.get((True, b))
        cells = [f"{b:5d}", ms(eager), ms(graphs), f"{upper / 1e6:8.1f}", f"{expected / 1e6:9.1f}"]
        if bandwidth is not None:
            roof = expected / bandwidth
            pct = lambda t, r=roof: f"{100 * r / t:.1f}%" if t else "-"  # noqa: E731
            cells += [f"{1e3 * upper / bandwidth:11.3f}", f"{1e3 * roof:8.3f}", f"{pct(eager):>11}",
                      f"{pct(graphs):>7}", f"{pct(graphs, expected / sheet) if sheet else '-':>13}"]
            if b == 64:
                cells.append(f"(target >= 50%: {'ok' if graphs and roof / graphs >= 0.5 else 'MISS'})")
        run.figure(" ".join(cells))
    return True


# ---------------------------------------------------------------------------------------------- subprocesses


def subprocess_output(cmd: list[str], timeout: float) -> tuple[int, str]:
    """(exit status, or -1 on a timeout; stdout, and on a failure stderr's last line)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        return -1, f"{out}\ntimed out after {timeout:.0f} s"
    tail = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
    return proc.returncode, proc.stdout + "".join(f"\nstderr: {line}" for line in tail)


def pytest_section(run: Run) -> bool:
    """A failed or erroring test fails the section; a test module that cannot be imported for a package this
    machine lacks (the device image has no hydra, omegaconf, fastapi...) is listed instead."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu and not slow", "-p", "no:cacheprovider",
           "--continue-on-collection-errors"] + (["--timeout", "150"] if find_spec("pytest_timeout") else [])
    cmd += [] if run.cuda else ["tests/serve/test_gpu.py"]  # CPU: every gpu test is skipped; ours show that
    rc, out = subprocess_output(cmd, min(run.args.pytest_timeout, run.deadline - time.monotonic()))
    lines = out.splitlines()
    failed = [line for line in lines if line.startswith("FAILED") or line.startswith("ERROR") and "::" in line]
    uncollected = [line.split()[1] for line in lines if line.startswith("ERROR") and "::" not in line]
    missing = re.findall(r"^E +ModuleNotFoundError: No module named '(\w+)", out, flags=re.M)
    for line in failed:
        run.figure(line[:200])
    if uncollected:
        run.figure(f"not collected, {len(missing)} for a missing package ({', '.join(sorted(set(missing)))}): "
                   + " ".join(uncollected))
    summary = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b.* in [\d.]+s|^timed out|^stderr")
    run.figure(f"pytest -m gpu: {' | '.join(line for line in lines if summary.search(line)) or out[-300:]} (exit {rc})")
    return rc == 0 or (rc == 1 and not failed and 0 < len(uncollected) <= len(missing))


def kernels(run: Run) -> bool:
    if not run.cuda:
        print("  gpu_moe / gpu_fp8 rows: skipped: no CUDA", flush=True)
        return True
    ok = True
    for module, *flags in KERNEL_ROWS:
        timeout = min(run.args.kernel_timeout, run.deadline - time.monotonic())
        rc, out = subprocess_output([sys.executable, "-m", module, *flags], timeout)
        for line in filter(str.strip, out.splitlines()):
            run.figure(f"{module[11:]}: {line}", summary="MISS" in line or "FAIL" in line)
        run.figure(f"{module}: exit {rc}")
        ok &= rc == 0
    return ok


SECTIONS = {"parity": parity, "offline": offline, "decode": decode, "pytest": pytest_section, "kernels": kernels}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--cpu-smoke", action="store_true", help="the CPU, tiny shapes, no CUDA-only parts")
    p.add_argument("--budget-s", type=float, default=420,
                   help="seconds for the whole run: subprocesses get what is left, no section starts with < 30 s")
    for name, default in (("hidden", 2048), ("ffn", 4096), ("layers", 8), ("experts", 8), ("top-k", 2),
                          ("head-dim", 128), ("requests", 64), ("max-num-seqs", 64), ("reps", 30), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--hf-batches", default="32,64", help="transformers static batch sizes; the best counts")
    p.add_argument("--decode-batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--pytest-timeout", type=float, default=150)
    p.add_argument("--kernel-timeout", type=float, default=75, help="seconds for each of gpu_moe and gpu_fp8")
    p.add_argument("--json", metavar="PATH", help="also write the figures and results as JSON (after each section)")
    args = p.parse_args(argv)
    if args.cpu_smoke:  # tiny shapes; one intra-op thread (2 threads on a shared 2-core machine are 10x slower)
        args.hidden, args.ffn, args.layers, args.head_dim, args.requests = 64, 128, 2, 16, 8
        args.hf_batches, args.decode_batches, args.reps, args.max_num_seqs = "4,8", [1, 8], 5, 8
        torch.set_num_threads(1)
    return args


def header(device: torch.device) -> None:
    import transformers

    for cmd in (["uptime"], ["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv"]):
        if shutil.which(cmd[0]):
            print(subprocess.run(cmd, capture_output=True, text=True).stdout.strip())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}) | torch {torch.__version__} | transformers {transformers.__version__}", flush=True)


def one_line(err: Exception) -> str:
    """The exception, and the innermost frame of this repository's code it went through."""
    root = str(Path(__file__).parents[1])
    ours = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith(root)] or [None]
    where = f" ({Path(ours[-1].filename).relative_to(root)}:{ours[-1].lineno})" if ours[-1] else ""
    return f"FAILED {type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}{where}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("benchmarks/gpu_serve.py needs a CUDA GPU (none found); --cpu-smoke runs it on the CPU", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    header(device)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu_serve-") as tmp:
        run = Run(args, device, Path(tmp), time.monotonic() + args.budget_s)
        for name in args.sections:
            print(f"\n== {name}", flush=True)
            start = time.perf_counter()
            try:
                if run.deadline - time.monotonic() < 30:
                    results[name] = f"SKIPPED: under 30 s left of --budget-s {args.budget_s:.0f}"
                else:
                    errors = len(run.errors)
                    results[name] = "ok" if SECTIONS[name](run) and len(run.errors) == errors else "FAILED"
            except Exception as err:  # one line here, the traceback in the JSON; then the next section
                results[name], run.tracebacks[name] = one_line(err), traceback.format_exc()
            print(f"  [{name}: {results[name]}, {time.perf_counter() - start:.1f} s]", flush=True)
            gc.collect()
            if run.cuda:
                torch.cuda.empty_cache()
            if args.json:
                record = dict(device=str(device), summary=run.summary, results=results, tracebacks=run.tracebacks)
                Path(args.json).write_text(json.dumps(record, indent=1))
    print("\n== summary")
    for line in run.summary + [f"{name:8} {result}" for name, result in results.items()]:
        print(f"  {line}")
    return 0 if all(r == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
