"""Inference overhead of HyperMoE over the plain MoE layer, Mixtral-shaped, fp32, CPU.

    python -m benchmarks.hypermoe_overhead                      # D=1024 F=2816 E=8 K=2, T in 1 32 128 512
    python -m benchmarks.hypermoe_overhead --tokens 1 32 --reps 5 --threads 2

Peers share the routed weights and are timed round-robin (median of --reps) under ``torch.inference_mode``:
``plain`` (no HyperMoE), ``hyper`` (the default: adapters of all C(E, K) selected sets cached across steps)
and ``hyper-nocache`` (``cache_max_selections=0``: adapters generated once per unique set in every batch).
One thread by default: on a shared 2-core machine, 2-thread timings of small GEMMs stall whenever the other
core is busy, and the noise swamps a few-percent difference.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import interleaved_medians
from hypermoe import HyperMoEConfig
from moe import MoE, MoEConfig


def build_layers(D: int, F: int, E: int, K: int) -> dict[str, MoE]:
    plain = MoE(MoEConfig(D, F, E, K)).eval()
    layers = {"plain": plain}
    for name, cache in (("hyper", HyperMoEConfig().cache_max_selections), ("hyper-nocache", 0)):
        layer = MoE(MoEConfig(D, F, E, K, hypermoe=HyperMoEConfig(cache_max_selections=cache))).eval()
        missing, unexpected = layer.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("hypermoe.") for k in missing)
        layers[name] = layer
    layers["hyper-nocache"].hypermoe.load_state_dict(layers["hyper"].hypermoe.state_dict())
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 128, 512])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    D, F, E, K = args.hidden, args.ffn, args.experts, args.top_k
    layers = build_layers(D, F, E, K)
    print(f"D={D} F={F} E={E} K={K} fp32, {args.threads} thread(s), median of {args.reps} interleaved reps")
    with torch.inference_mode():
        x = torch.randn(4, D)
        start = time.perf_counter()
        layers["hyper"](x)  # first call builds the table of all C(E, K) adapters
        print(f"adapter table build (first call, {layers['hyper'].hypermoe._table.w_down_UAD.shape[0]} sets): "
              f"{1e3 * (time.perf_counter() - start):.1f} ms")
        print(f"{'T':>5} {'plain ms':>9} {'hyper ms':>9} {'overhead':>9} {'nocache ms':>11} {'overhead':>9}")
        for T in args.tokens:
            x = torch.randn(T, D)
            diff = (layers["hyper"](x) - layers["plain"](x)).abs().max().item()
            assert diff > 0, "the adapter output is missing"
            fns = {name: (lambda layer=layer: layer(x)) for name, layer in layers.items()}
            med = interleaved_medians(fns, reps=args.reps, warmup=2)
            over = {name: 100.0 * (med[name] / med["plain"] - 1.0) for name in ("hyper", "hyper-nocache")}
            print(f"{T:>5} {1e3 * med['plain']:>9.2f} {1e3 * med['hyper']:>9.2f} {over['hyper']:>+8.1f}% "
                  f"{1e3 * med['hyper-nocache']:>11.2f} {over['hyper-nocache']:>+8.1f}%")


if __name__ == "__main__":
    main()
