"""Overhead of ``RoutingStats`` on the MoE layer forward (the layer benchmark's Mixtral shape), fp32, CPU.

    python -m benchmarks.routing_stats_overhead                  # D=1024 F=2816 E=8 K=2, T in 1 32 128 512 2048
    python -m benchmarks.routing_stats_overhead --tokens 1 32 --reps 31 --threads 1

One layer, timed round-robin (median of --reps, ``torch.inference_mode``) as three peers: ``off`` (no observer),
``on`` (``RoutingStats`` attached; ``step()`` after every forward, as an offline caller would) and ``off2`` (the
same as ``off``: the A/A gap is the noise floor of this run; the baseline is their mean). The hook itself
(``record`` + ``step`` on the routing of that T) is also timed alone, so the overhead is given twice: measured
(on/off - 1) and computed (hook time / layer time), the second immune to the machine's noise. Target: <= 2%.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved_medians
from moe import MoE, MoEConfig
from routing.stats import RoutingStats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 128, 512, 2048])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    D, F, E, K = args.hidden, args.ffn, args.experts, args.top_k
    layer = MoE(MoEConfig(D, F, E, K)).eval()
    stats = RoutingStats.attach(layer, window=100)
    recorder = layer.on_routing

    def forward(x, observer):
        layer.on_routing = observer
        layer(x)
        if observer is not None:
            stats.step()

    def hook(routing):
        recorder(routing)
        stats.step()

    print(f"D={D} F={F} E={E} K={K} fp32, {args.threads} thread(s), median of {args.reps} interleaved reps")
    print(f"{'T':>5} {'off ms':>9} {'on ms':>9} {'off2 ms':>9} | {'measured':>9} {'A/A noise':>9} "
          f"{'hook us':>8} {'computed':>9}")
    with torch.inference_mode():
        for T in args.tokens:
            x = torch.randn(T, D)
            routing = layer.router(x)
            fns = {"off": lambda: forward(x, None), "on": lambda: forward(x, recorder),
                   "off2": lambda: forward(x, None)}
            med = interleaved_medians(fns, reps=args.reps, warmup=2)
            hook_s = interleaved_medians({"hook": lambda: [hook(routing) for _ in range(100)]}, reps=args.reps)
            hook_s = hook_s["hook"] / 100
            off = (med["off"] + med["off2"]) / 2
            print(f"{T:>5} {1e3 * med['off']:>9.2f} {1e3 * med['on']:>9.2f} {1e3 * med['off2']:>9.2f} | "
                  f"{100 * (med['on'] / off - 1):>+8.2f}% {100 * (med['off2'] / med['off'] - 1):>+8.2f}% "
                  f"{1e6 * hook_s:>8.1f} {100 * hook_s / off:>8.2f}%")
    layer.on_routing = recorder
    stats.detach()
    counted = int(stats.cumulative_counts().sum())
    print(f"(counted {counted} routed rows in total; the figures above include step() after every forward)")


if __name__ == "__main__":
    main()
