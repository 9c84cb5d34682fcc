"""Our ``moe.MoE`` layer alone against the same layer in ggml (llama.cpp's CPU math), same weights, interleaved.

    bash benchmarks/peers/install_llamacpp.sh                  # once: ~/peers/llamacpp (its libggml)
    python -m benchmarks.peers.moe_layer_bench [--tokens 1,8,32,128] [--threads 1] [--repeats 3]

The layer of ``llamacpp_convert.py``'s Mixtral (D 1024, 8 experts of F 1536, top-2, softmax router with
renormalised weights, SwiGLU). ggml's side is ``ggml_moe.c``: the graph llama.cpp's ``build_moe_ffn`` builds for
Mixtral, op for op, computed by ggml's CPU backend (``ggml_graph_compute_with_ctx``); it is compiled here against
the peer build's ``libggml``. Why not llama.cpp itself: its eval of T tokens runs attention, norms and the head
too, and no subtraction of those is honest; this is the MoE graph alone, in the same library, but assembled by us,
not by llama.cpp's model code. Per T: both sides get the same random weights and tokens; ``--iters`` forwards per
turn, best and median; turns alternate ``--repeats`` times; the best counts. Printed: load average, microseconds
per forward, the ratio (ggml / ours: above 1 means ours is faster) and the largest difference of the outputs;
then the hardware limit: the expert weights a forward must read (the experts its tokens select, fp32) over the
read rate of a warm buffer of that size (the same threads), and the share of it each side reaches.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_load
from moe import MoE, MoEConfig

HERE = Path(__file__).parent
PEER = Path.home() / "peers/llamacpp"


def build_harness(peer: Path, out: Path) -> Path:
    src = peer / "src/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/include"
    libs = sorted({p.parent for p in peer.joinpath("build").rglob("libggml-cpu.so")})
    if not libs:
        raise FileNotFoundError(f"no libggml-cpu.so under {peer / 'build'}: run install_llamacpp.sh first")
    exe = out / "ggml_moe"
    subprocess.run(["gcc", "-O2", str(HERE / "ggml_moe.c"), f"-I{src}", f"-L{libs[0]}", "-lggml", "-lggml-base",
                    "-lggml-cpu", f"-Wl,-rpath,{libs[0]}", "-lm", "-o", str(exe)], check=True)
    return exe


@torch.inference_mode()
def time_ours(layer: MoE, x_TD: torch.Tensor, iters: int) -> tuple[float, float]:
    layer(x_TD)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        layer(x_TD)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def read_bandwidth(nbytes: int, passes: int = 20) -> float:
    """Bytes per second that reading a warm buffer of ``nbytes`` reaches (the best pass of torch's sum and of its
    matrix-vector product): the rate of whatever level of the memory holds a working set of that size, as the
    layer's weights are held between its forwards (a large L3 holds them all on some machines)."""
    buf = torch.ones(max(1024, nbytes // 4 // 1024 * 1024))
    rows, ones = buf.view(-1, 1024), torch.ones(1024)
    best = float("inf")
    for read in (buf.sum, lambda: torch.mv(rows, ones)):
        for _ in range(passes):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def weight_bytes(layer: MoE, x_TD: torch.Tensor) -> int:
    """The fp32 bytes a forward of ``x_TD`` must read: the router and every expert its tokens select."""
    K = layer.router.config.top_k
    chosen = (x_TD @ layer.router.weight.detach().t()).topk(K, dim=-1).indices.unique().numel()
    per_expert = layer.experts.w13_E2FD[0].numel() + layer.experts.w2_EDF[0].numel()
    return 4 * (layer.router.weight.numel() + chosen * per_expert)


def write_weights(layer: MoE, x_TD: torch.Tensor, path: Path) -> None:
    w13_E2FD = layer.experts.w13_E2FD.detach()
    F = w13_E2FD.shape[1] // 2
    gate_EFD, up_EFD = w13_E2FD[:, :F], w13_E2FD[:, F:]
    parts = [layer.router.weight.detach(), up_EFD, gate_EFD, layer.experts.w2_EDF.detach(), x_TD]
    path.write_bytes(b"".join(p.float().contiguous().numpy().tobytes() for p in parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,8,32,128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--peer", default=str(PEER))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="ggml-moe-"))
    exe = build_harness(Path(args.peer), tmp)
    D, F, E, K = args.hidden, args.ffn, args.experts, args.top_k
    layer = MoE(MoEConfig(hidden_size=D, ffn_size=F, num_experts=E, top_k=K)).eval()
    print(f"MoE D={D} F={F} E={E} K={K}, threads={args.threads}, {args.iters} forwards a turn; load {machine_load()}")
    rows = []
    for T in map(int, args.tokens.split(",")):
        x_TD = torch.randn(T, D)
        write_weights(layer, x_TD, tmp / "weights.f32")
        best = {"ours": float("inf"), "ggml": float("inf")}
        for turn in range(args.repeats):
            ours = time_ours(layer, x_TD, args.iters)
            run = subprocess.run([str(exe), str(tmp / "weights.f32"), *map(str, (D, F, E, K, T, args.iters,
                                  args.threads)), str(tmp / "out.f32")], capture_output=True, text=True, check=True)
            theirs = tuple(map(float, run.stdout.split()))
            best = {"ours": min(best["ours"], ours[0]), "ggml": min(best["ggml"], theirs[0])}
            print(f"  T={T:4d} turn {turn}: load {machine_load()}; "
                  f"ours {1e6 * ours[0]:9.1f} us (median {1e6 * ours[1]:.1f}), "
                  f"ggml {1e6 * theirs[0]:9.1f} us (median {1e6 * theirs[1]:.1f})", flush=True)
        with torch.inference_mode():
            expected_TD = layer(x_TD)
        got_TD = torch.frombuffer(bytearray((tmp / "out.f32").read_bytes()), dtype=torch.float32).view(T, D)
        diff = (got_TD - expected_TD).abs().max().item() / expected_TD.abs().max().item()
        rows.append((T, best["ours"], best["ggml"], diff, weight_bytes(layer, x_TD)))
    print(f"\nbest of {args.repeats} turns (us per forward), load {machine_load()}:")
    for T, ours, ggml, diff, _ in rows:
        print(f"  T={T:4d}: ours {1e6 * ours:9.1f}, ggml {1e6 * ggml:9.1f}, ggml/ours {ggml / ours:5.2f}x; "
              f"max |diff| / max |ours| = {diff:.1e}")
    print(f"\nhardware limit ({args.threads} thread(s)): the fp32 weights each forward reads, over the read rate of a "
          f"warm buffer that size; load {machine_load()}")
    for T, ours, ggml, _, nbytes in rows:
        bandwidth = read_bandwidth(nbytes)
        floor = nbytes / bandwidth
        print(f"  T={T:4d}: {nbytes / 2**20:6.1f} MiB at {bandwidth / 1e9:5.1f} GB/s, floor {1e6 * floor:8.1f} us; "
              f"ours at {100 * floor / ours:4.0f}% of the limit, ggml at {100 * floor / ggml:4.0f}%")

if __name__ == "__main__":
    main()
