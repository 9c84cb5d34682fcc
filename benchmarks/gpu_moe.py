"""GPU benchmark of the Triton MoE backend: bf16 correctness, then ours vs the torch._grouped_mm path vs rooflines.

    python -m benchmarks.gpu_moe                                   # all three models, every T, autotuned
    python -m benchmarks.gpu_moe --models qwen3 --tokens 1 64 4096 --reps 20 --no-autotune

Layers (routed experts only, bf16, uniform random top-k routing): Mixtral-8x7B (D=4096, F=14336, E=8, K=2),
Qwen3-30B-A3B (D=2048, F=768, E=128, K=8), DeepSeek-V3 (D=7168, F=2048, E=256, K=8).

- **ours**: ``moe.triton_backend.triton_moe_forward`` (device shuffle, grouped GEMM 1 + SwiGLU, grouped GEMM 2
  + weighted scatter-add).
- **grouped_mm**: the torch backend on CUDA, i.e. what ``transformers`` does: ``moe.shuffle`` (torch.sort),
  gather, ``torch._grouped_mm`` -> SwiGLU -> ``torch._grouped_mm``, un-permute and weighted sum.
- **dense roofline**: one cuBLAS bf16 GEMM with the same FLOPs (``[N, D] @ [D, 3F]``, N = T*K).
- **memory roofline**: bytes of the experts actually hit (+ x and y) / measured device-to-device copy bandwidth.
- **graph**: CUDA-graph replay of the whole routed-expert forward at T in {1, 16, 64}.

Times are medians of CUDA-event timings with the L2 cache flushed between repetitions; every figure comes
from this one run. Targets (issue 3, H100): ours >= 1.2x grouped_mm at every T, >= 70% of the memory
roofline at T <= 64, >= 70% of the dense roofline at T >= 4096.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from all_to_all.dispatcher import LocalDispatcher
from moe.activations import ActivationSpec
from moe.backends import grouped_mm_ffn
from moe.config import MoEConfig
from moe.experts import Experts
from moe.reference import reference_moe
from routing.router import Routing


@dataclass(frozen=True)
class Shape:
    D: int
    F: int
    E: int
    K: int


MODELS = {
    "mixtral": Shape(4096, 14336, 8, 2),
    "qwen3": Shape(2048, 768, 128, 8),
    "deepseek": Shape(7168, 2048, 256, 8),
}
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
GRAPH_TOKENS = [1, 16, 64]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS, help="token counts T to time")
    p.add_argument("--graph-tokens", nargs="*", type=int, default=GRAPH_TOKENS, help="T for CUDA-graph replay")
    p.add_argument("--check-tokens", nargs="*", type=int, default=[1, 64, 1024], help="T for the bf16 check")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per figure (median)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-autotune", dest="autotune", action="store_false", help="use the default tile table")
    p.add_argument("--deterministic", action="store_true", help="time the atomic-free combine")
    p.add_argument("--no-flush", dest="flush", action="store_false", help="keep L2 warm between repetitions")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if min(args.tokens + args.graph_tokens + args.check_tokens, default=1) < 1 or args.reps < 1:
        p.error("token counts and --reps must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------- timing


class Timer:
    """Median CUDA-event time of a callable, flushing L2 (a 256 MiB write) before each repetition."""

    def __init__(self, reps: int, warmup: int, flush: bool) -> None:
        self.reps, self.warmup = reps, warmup
        self.scratch = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if flush else None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.reps):
            if self.scratch is not None:
                self.scratch.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return statistics.median(samples)


def copy_bandwidth(timer: Timer, num_bytes: int = 2**30) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * num_bytes / timer(lambda: dst.copy_(src))


def graph_replay_time(fn: Callable[[], object], timer: Timer) -> float:
    """Capture ``fn`` (already warmed up: compiled and autotuned) in a CUDA graph and time its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timer(graph.replay)


# ---------------------------------------------------------------------------------------------- the layers


def make_experts(shape: Shape) -> Experts:
    """bf16 experts built straight on the GPU (an fp32 init on the host would need 45 GB for DeepSeek-V3)."""
    with torch.device("meta"):
        experts = Experts(MoEConfig(shape.D, shape.F, shape.E, shape.K))
    w13 = torch.randn(shape.E, 2 * shape.F, shape.D, device="cuda", dtype=torch.bfloat16).mul_(shape.D**-0.5)
    w2 = torch.randn(shape.E, shape.D, shape.F, device="cuda", dtype=torch.bfloat16).mul_(shape.F**-0.5)
    experts.w13_E2FD = torch.nn.Parameter(w13, requires_grad=False)
    experts.w2_EDF = torch.nn.Parameter(w2, requires_grad=False)
    return experts


def make_inputs(shape: Shape, T: int) -> tuple[torch.Tensor, Routing]:
    x_TD = torch.randn(T, shape.D, device="cuda", dtype=torch.bfloat16)
    logits_TE = torch.randn(T, shape.E, device="cuda")
    top_TK, ids_TK = logits_TE.topk(shape.K, dim=-1)
    return x_TD, Routing(torch.softmax(top_TK, dim=-1), ids_TK.to(torch.int32), logits_TE)


def grouped_mm_forward(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """The torch backend's CUDA path (LocalDispatcher + two torch._grouped_mm), as ``moe.MoE`` runs it."""
    dispatcher = LocalDispatcher(experts.num_experts)
    x_RD, counts_E, meta = dispatcher.dispatch(x_TD, routing)
    y_RD = grouped_mm_ffn(x_RD, counts_E, experts.w13_E2FD, experts.w2_EDF, ActivationSpec.of(experts.config))
    return dispatcher.combine(y_RD, meta)


def triton_forward(args: argparse.Namespace) -> Callable[[torch.Tensor, Routing, Experts], torch.Tensor]:
    from moe.triton_backend import triton_moe_forward

    return lambda x_TD, routing, experts: triton_moe_forward(
        x_TD, routing, experts, args.deterministic, autotune=args.autotune
    )


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- figures


def check(shape: Shape, experts: Experts, ours: Callable, tokens: list[int]) -> list[dict]:
    """bf16 results of both paths against the fp32 reference (``moe/reference.py``)."""
    rows = []
    for T in tokens:
        x_TD, routing = make_inputs(shape, T)
        x_TD = 0.1 * x_TD
        expected = reference_moe(x_TD, routing.weights_TK, routing.ids_TK, experts.w13_E2FD, experts.w2_EDF)
        got, peer = ours(x_TD, routing, experts), grouped_mm_forward(x_TD, routing, experts)
        rows.append(dict(T=T, ours_rel_err=rel_err(got, expected), grouped_mm_rel_err=rel_err(peer, expected),
                         ours_max_abs=(got.float() - expected).abs().max().item()))
    return rows


def rooflines(shape: Shape, T: int, routing: Routing, timer: Timer, bandwidth: float) -> tuple[float, float]:
    """(dense cuBLAS time with the same FLOPs, bytes of the hit experts + x + y over copy bandwidth)."""
    N = T * shape.K
    a_ND = torch.randn(N, shape.D, device="cuda", dtype=torch.bfloat16)
    b_DX = torch.randn(shape.D, 3 * shape.F, device="cuda", dtype=torch.bfloat16)
    dense = timer(lambda a=a_ND, b=b_DX: torch.mm(a, b))
    del a_ND, b_DX
    experts_hit = torch.unique(routing.ids_TK).numel()  # NOTE: host sync, outside the timed region
    weight_bytes = experts_hit * 3 * shape.F * shape.D * 2
    io_bytes = T * shape.D * (2 + 4)  # bf16 x in, fp32 y out
    return dense, (weight_bytes + io_bytes) / bandwidth


def bench_model(name: str, shape: Shape, args: argparse.Namespace, timer: Timer, bandwidth: float) -> dict:
    experts = make_experts(shape)
    ours = triton_forward(args)
    out = dict(model=name, shape=asdict(shape), check=check(shape, experts, ours, args.check_tokens), rows=[])
    for T in args.tokens:
        x_TD, routing = make_inputs(shape, T)
        t_ours = timer(lambda e=experts: ours(x_TD, routing, e))
        t_peer = timer(lambda e=experts: grouped_mm_forward(x_TD, routing, e))
        dense, memory = rooflines(shape, T, routing, timer, bandwidth)
        row = dict(T=T, ours_ms=1e3 * t_ours, grouped_mm_ms=1e3 * t_peer, speedup=t_peer / t_ours,
                   dense_ms=1e3 * dense, memory_ms=1e3 * memory, dense_frac=dense / t_ours,
                   memory_frac=memory / t_ours, graph_ms=None, graph_grouped_mm_ms=None)
        if T in args.graph_tokens:
            row["graph_ms"] = 1e3 * graph_replay_time(lambda e=experts: ours(x_TD, routing, e), timer)
            try:
                row["graph_grouped_mm_ms"] = 1e3 * graph_replay_time(
                    lambda e=experts: grouped_mm_forward(x_TD, routing, e), timer)
            except RuntimeError as err:  # the peer may not be capturable; say so instead of hiding it
                print(f"  [{name} T={T}] grouped_mm path not capturable: {err}", file=sys.stderr)
        out["rows"].append(row)
        print_row(name, row)
    del experts
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- output

HEADER = (f"{'model':9} {'T':>6} {'ours ms':>9} {'gmm ms':>9} {'x gmm':>6} {'dense ms':>9} {'%dense':>7} "
          f"{'mem ms':>9} {'%mem':>6} {'graph ms':>9} {'gmm graph':>9}  targets")


def print_row(name: str, row: dict) -> None:
    T = row["T"]
    targets = ["ok" if row["speedup"] >= 1.2 else "MISS x1.2"]
    if T <= 64:
        targets.append("ok" if row["memory_frac"] >= 0.7 else "MISS mem70")
    if T >= 4096:
        targets.append("ok" if row["dense_frac"] >= 0.7 else "MISS dense70")
    fmt = lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9}"  # noqa: E731
    print(f"{name:9} {T:6d} {row['ours_ms']:9.3f} {row['grouped_mm_ms']:9.3f} {row['speedup']:6.2f} "
          f"{row['dense_ms']:9.3f} {100 * row['dense_frac']:6.1f}% {row['memory_ms']:9.3f} "
          f"{100 * row['memory_frac']:5.1f}% {fmt(row['graph_ms'])} {fmt(row['graph_grouped_mm_ms'])}  "
          + ",".join(targets), flush=True)


def print_checks(results: list[dict]) -> bool:
    ok = True
    print("\nbf16 check vs moe/reference.py (fp32): relative L2 error, must be <= 1e-2")
    for res in results:
        for c in res["check"]:
            good = c["ours_rel_err"] <= 1e-2
            ok &= good
            print(f"  {res['model']:9} T={c['T']:6d} ours {c['ours_rel_err']:.2e} (max abs {c['ours_max_abs']:.2e})"
                  f"  grouped_mm {c['grouped_mm_rel_err']:.2e}  {'ok' if good else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_moe.py needs a CUDA GPU (none found); nothing measured.", file=sys.stderr)
        return 2
    import triton

    timer = Timer(args.reps, args.warmup, args.flush)
    bandwidth = copy_bandwidth(timer)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"d2d copy {bandwidth / 1e9:.0f} GB/s | autotune={args.autotune} deterministic={args.deterministic}\n")
    print(HEADER)
    with torch.inference_mode():
        results = [bench_model(name, MODELS[name], args, timer, bandwidth) for name in args.models]
    ok = print_checks(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), bandwidth=bandwidth, results=results), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
