"""CPU layer benchmark: ours vs transformers' Mixtral block (eager, grouped_mm) vs DeepSpeed-MoE vs rooflines.

    python -m benchmarks.layer                 # Mixtral-shaped: D=1024 F=2816 E=8 K=2, fp32, 2 threads
    python -m benchmarks.layer --tokens 1 32 --reps 3

Every figure comes from one run, peers timed round-robin (median of --reps), so the ratios are robust to the
noise of a shared machine. Rooflines: "dense" = the fastest dense GEMM pair (F.linear or w @ x.T) doing the
same FLOPs; "memory" = bytes of the experts actually hit / the streaming-read bandwidth (the best of a probe
before the run and one timed among the peers of each row).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import socket

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import fma_peak_flops, interleaved_medians, memory_read_bandwidth, rel_err
from hypermoe import HyperMoEConfig
from moe import MoE
from quant import quantize_fp8


def build_hf_blocks(D: int, F_: int, E: int, K: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    blocks = {}
    for impl in ("eager", "grouped_mm"):
        cfg = MixtralConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=K,
                            experts_implementation=impl)
        blocks[impl] = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in blocks["eager"].parameters():
            p.normal_(0.0, 0.02)
        blocks["grouped_mm"].load_state_dict(blocks["eager"].state_dict())
    return blocks


class SwiGLUExpert(nn.Module):
    def __init__(self, D: int, F_: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, F_, bias=False), nn.Linear(D, F_, bias=False)
        self.w2 = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build_deepspeed(block, D: int, F_: int, E: int, K: int):
    """DeepSpeed-MoE (dropless) with the same SwiGLU experts and router weights, or None if not installed."""
    try:
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE as DeepSpeedMoE
    except ImportError:
        return None
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ds = DeepSpeedMoE(D, SwiGLUExpert(D, F_), num_experts=E, k=K, drop_tokens=False, min_capacity=0,
                      top2_2nd_expert_sampling=False).eval()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(block.gate.weight)
        for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            gate_up = block.experts.gate_up_proj[e]
            expert.w1.weight.copy_(gate_up[:F_])
            expert.w3.weight.copy_(gate_up[F_:])
            expert.w2.weight.copy_(block.experts.down_proj[e])
    return ds


def with_hypermoe(layer: MoE) -> MoE:
    """``layer`` plus a HyperMoE adapter (default config), sharing its router and routed expert weights."""
    hyper = MoE(dataclasses.replace(layer.config, hypermoe=HyperMoEConfig())).eval()
    missing, unexpected = hyper.load_state_dict(layer.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("hypermoe.") for k in missing)
    return hyper


def dense_roofline_fns(N: int, D: int, F_: int):
    """Two dense GEMM pairs with the FLOPs of N routed rows through one expert-shaped MLP."""
    x, w13, w2 = torch.randn(N, D), torch.randn(2 * F_, D), torch.randn(D, F_)
    h = torch.randn(N, F_)
    return {
        "dense F.linear": lambda: (F.linear(x, w13), F.linear(h, w2)),
        "dense w@x.T": lambda: (torch.mm(w13, x.t()), torch.mm(w2, h.t())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8 (channel, block) rows")
    ap.add_argument("--no-hypermoe", action="store_true", help="skip the HyperMoE overhead rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    D, F_, E, K = args.hidden, args.ffn, args.experts, args.top_k

    probe = torch.ones(256 * 2**20 // 4)  # streamed by a `sum` timed among the peers: bandwidth under the same load
    bandwidth = memory_read_bandwidth()
    peak = fma_peak_flops(args.threads) or float("nan")
    blocks = build_hf_blocks(D, F_, E, K)
    ours = MoE.from_hf(blocks["eager"])
    ds = None if args.no_deepspeed else build_deepspeed(blocks["eager"], D, F_, E, K)
    fp8 = {} if args.no_fp8 else {s: quantize_fp8(copy.deepcopy(ours), s) for s in ("channel", "block")}
    hyper = None if args.no_hypermoe else with_hypermoe(ours)
    fp8_rows, hyper_rows = [], []
    expert_bytes = (blocks["eager"].experts.gate_up_proj[0].numel() + blocks["eager"].experts.down_proj[0].numel()) * 4
    print(f"layer D={D} F={F_} E={E} K={K} fp32, {args.threads} threads; "
          f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; FMA peak {peak / 1e9:.0f} GFLOP/s")
    print("% peak: the layer's expert FLOPs (6 T K D F) / its time / the FMA peak")
    header = (f"{'T':>5} {'ours ms':>9} {'hf eager':>9} {'hf gmm':>9} {'deepspeed':>9} {'dense ms':>9} {'mem ms':>8} |"
              f" {'vs best HF':>10} {'vs DS':>6} {'% dense':>8} {'% memory':>8} {'% peak':>7} {'err':>8}")
    print(header)
    for T in args.tokens:
        x = torch.randn(1, T, D)
        fns = {"ours": lambda: ours(x), "hf eager": lambda: blocks["eager"](x),
               "hf gmm": lambda: blocks["grouped_mm"](x)}
        if ds is not None:
            fns["deepspeed"] = lambda: ds(x)
        fns.update(dense_roofline_fns(T * K, D, F_))
        fns.update({f"fp8 {s}": (lambda m=m: m(x)) for s, m in fp8.items()})
        if hyper is not None:
            ids_TK = hyper.router(x.view(T, D)).ids_TK
            fns["hypermoe"] = lambda: hyper(x)
            fns["hypermoe adapter"] = lambda: hyper.hypermoe(x.view(T, D), ids_TK)  # + the y_TD add
        fns["bandwidth probe"] = probe.sum
        with torch.no_grad():
            err = rel_err(ours(x), blocks["eager"](x))
            experts_hit = ours.router(x.view(T, D)).ids_TK.unique().numel()
            t = interleaved_medians(fns, args.reps)
        dense = min(t["dense F.linear"], t["dense w@x.T"])
        memory = experts_hit * expert_bytes / max(bandwidth, probe.numel() * 4 / t["bandwidth probe"])
        best_hf = min(t["hf eager"], t["hf gmm"])
        ds_t = t.get("deepspeed", float("nan"))
        ms = lambda s: f"{s * 1e3:9.2f}"  # noqa: E731
        print(f"{T:>5} {ms(t['ours'])} {ms(t['hf eager'])} {ms(t['hf gmm'])} {ms(ds_t)} {ms(dense)} "
              f"{memory * 1e3:8.2f} | {best_hf / t['ours']:9.2f}x {ds_t / t['ours']:5.2f}x "
              f"{dense / t['ours']:7.0%} {memory / t['ours']:8.0%}"
              f" {6 * T * K * D * F_ / t['ours'] / peak:7.0%} {err:8.1e}")
        if fp8:
            with torch.no_grad():
                errs = {s: rel_err(m(x), ours(x)) for s, m in fp8.items()}
            fp8_rows.append((T, t["ours"], {s: (t[f"fp8 {s}"], errs[s]) for s in fp8}))
        if hyper is not None:
            hyper_rows.append((T, t["ours"], t["hypermoe"], t["hypermoe adapter"]))
    print_fp8(fp8_rows)
    print_hypermoe(hyper_rows)


def print_fp8(rows) -> None:
    if not rows:
        return
    print("\nFP8 experts (e4m3fn weights, fp32 compute) vs our fp32 layer, same run; err = relative to fp32 output")
    print(f"{'T':>5} {'fp32 ms':>9} {'channel':>9} {'block':>9} | {'ch speedup':>10} {'blk speedup':>11} "
          f"{'ch err':>8} {'blk err':>8}")
    for T, t32, by in rows:
        (tc, ec), (tb, eb) = by["channel"], by["block"]
        print(f"{T:>5} {t32 * 1e3:9.2f} {tc * 1e3:9.2f} {tb * 1e3:9.2f} | {t32 / tc:9.2f}x {t32 / tb:10.2f}x "
              f"{ec:8.1e} {eb:8.1e}")


def print_hypermoe(rows) -> None:
    if not rows:
        return
    print("\nHyperMoE (adapter from the unselected experts, cached per selected set) vs our plain layer, same run")
    print("overhead measured = hyper / plain - 1; computed = adapter alone / plain (immune to the machine's noise)")
    print(f"{'T':>5} {'plain ms':>9} {'hyper ms':>9} {'adapter ms':>10} | {'measured':>9} {'computed':>9}"
          "  (target <= 10% at T >= 32)")
    for T, plain, hyper, adapter in rows:
        print(f"{T:>5} {plain * 1e3:9.2f} {hyper * 1e3:9.2f} {adapter * 1e3:10.2f} | "
              f"{100 * (hyper / plain - 1):+8.1f}% "
              f"{100 * adapter / plain:+8.1f}%")


if __name__ == "__main__":
    main()
