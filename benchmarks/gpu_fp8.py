"""GPU benchmark of the Triton FP8 grouped GEMMs: fp8-block (and fp8-channel) against the bf16 Triton path.

    python -m benchmarks.gpu_fp8                                    # Mixtral, Qwen3, DeepSeek-V3 shapes
    python -m benchmarks.gpu_fp8 --models qwen3 --tokens 1 64 4096 --reps 20

Same layers, routing, timer (CUDA events, L2 flushed) and bf16 kernels as ``benchmarks/gpu_moe.py``; the FP8
experts hold the same weights quantised (``quant.Fp8Experts``, built one expert at a time on the GPU).
Accuracy: each FP8 path against the FP8-emulated reference (``moe.reference.reference_moe`` on dequantised
weights with 1x128-quantised activations), which must be <= 1e-3. Targets (issue 7, H100): FP8 >= 1.6x bf16
at T <= 64 and >= 1.5x at T >= 4096.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.gpu_moe import MODELS, TOKENS, Shape, Timer, make_experts, make_inputs, rel_err
from moe.config import MoEConfig
from moe.reference import reference_moe
from quant import Fp8Experts
from quant.fp8 import fake_quantize_activation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    p.add_argument("--schemes", nargs="+", choices=["fp8-block", "fp8-channel"], default=["fp8-block", "fp8-channel"])
    p.add_argument("--check-tokens", nargs="*", type=int, default=[1, 64, 1024])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-flush", dest="flush", action="store_false")
    args = p.parse_args(argv)
    if min(args.tokens + args.check_tokens, default=1) < 1 or args.reps < 1:
        p.error("token counts and --reps must be >= 1")
    return args


def fp8_experts(shape: Shape, bf16, scheme: str) -> Fp8Experts:
    """``bf16``'s weights quantised one expert at a time (a whole-layer fp32 copy would not fit for DeepSeek-V3)."""
    with torch.device("meta"):
        experts = Fp8Experts(MoEConfig(shape.D, shape.F, shape.E, shape.K, quant=scheme))
    experts = experts.to_empty(device="cuda")
    for e in range(shape.E):
        experts.load_weight("w13_E2FD", (e,), bf16.w13_E2FD[e])
        experts.load_weight("w2_EDF", (e,), bf16.w2_EDF[e])
    return experts


def emulated_error(shape: Shape, experts: Fp8Experts, forward, T: int) -> float:
    x_TD, routing = make_inputs(shape, T)
    w13, w2 = experts.dequantized()
    expected = reference_moe(x_TD, routing.weights_TK, routing.ids_TK, w13, w2,
                             input_quant=fake_quantize_activation)
    return rel_err(forward(x_TD, routing, experts), expected)


def bench_model(name: str, shape: Shape, args: argparse.Namespace, timer: Timer) -> bool:
    from moe.triton_backend import triton_moe_forward

    def forward(x_TD, routing, experts):
        return triton_moe_forward(x_TD, routing, experts, False)

    bf16 = make_experts(shape)
    fp8 = {s: fp8_experts(shape, bf16, s) for s in args.schemes}
    ok = True
    for scheme, experts in fp8.items():
        errors = [emulated_error(shape, experts, forward, T) for T in args.check_tokens]
        ok &= max(errors) <= 1e-3
        print(f"{name:9} {scheme}: error vs FP8-emulated reference {', '.join(f'{e:.1e}' for e in errors)}")
    for T in args.tokens:
        x_TD, routing = make_inputs(shape, T)
        t_bf16 = timer(lambda e=bf16: forward(x_TD, routing, e))
        cells = []
        for scheme, experts in fp8.items():
            speedup = t_bf16 / timer(lambda: forward(x_TD, routing, experts))
            target = 1.6 if T <= 64 else 1.5 if T >= 4096 else None
            mark = "" if target is None else (" ok" if speedup >= target else f" MISS x{target}")
            cells.append(f"{scheme} {speedup:5.2f}x{mark}")
        print(f"{name:9} T={T:6d} bf16 {1e3 * t_bf16:8.3f} ms | " + " | ".join(cells), flush=True)
    del bf16, fp8
    torch.cuda.empty_cache()
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_fp8.py needs a CUDA GPU (none found); nothing measured.", file=sys.stderr)
        return 2
    timer = Timer(args.reps, args.warmup, args.flush)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    with torch.inference_mode():
        ok = all([bench_model(name, MODELS[name], args, timer) for name in args.models])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
