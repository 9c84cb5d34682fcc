"""Expert-parallel dispatch/combine: measured on local gloo ranks vs the cost model; predictions for EP 8-256.

    python -m benchmarks.ep                          # 2, 3, 4 ranks; T=256 tokens/rank, D=1024, K=2, E=12, fp32
    python -m benchmarks.ep --ranks 2 4 --reps 20

1. Every rank count runs a sweep of raw ``all_to_all_single`` sizes; ``fit_link`` fits the local gloo link
   (overhead, per-peer latency, bandwidth) to all of them.
2. The same processes time ``AllToAllDispatcher`` and ``AllGatherDispatcher`` dispatch and combine on one
   routed step (identity experts, so only the exchange is timed) and the host sync of the split sizes.
   Each figure is the best over repetitions of the slowest rank, after a barrier.
3. The fitted model predicts those dispatcher times (it was fitted on raw collectives only), then predicts
   EP 8-256 on H100 NVLink + InfiniBand NDR for a DeepSeek-V3-shaped layer (vendor link figures, see
   ``all_to_all/cost_model.py``).
"""

from __future__ import annotations

import argparse
import datetime
import queue as queue_mod
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from all_to_all import AllGatherDispatcher, AllToAllDispatcher, EPComm
from all_to_all.cost_model import (
    H100_NVLINK_IB,
    LOCAL_GLOO,
    Step,
    fit_link,
    local_cluster,
    predict_all_gather,
    predict_all_to_all,
)
from expert_parallel import ExpertPlacement
from routing import Router, RouterConfig

SWEEP_BYTES = (1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 21, 1 << 23)


def timed(fn, reps: int, comm: EPComm | None = None) -> tuple[float, float]:
    """``(total, comm)``, best of ``reps`` (every rank starts together, after a barrier).

    Best rather than median: other users share this machine's 2 cores, and their bursts only ever add time.

    ``total``: the slowest rank's wall time of ``fn``. ``comm``: the least time any rank spent inside
    ``comm``'s collectives -- the last rank to arrive waits for nobody, so its time is the transfer itself,
    while the others' also holds their wait for it (compute skew, scheduling on an oversubscribed CPU).
    """
    fn()
    samples = torch.zeros(2, reps, dtype=torch.float64)
    for i in range(reps):
        if comm is not None:
            comm.stats.reset()
        dist.barrier()
        start = time.perf_counter()
        fn()
        samples[0, i] = time.perf_counter() - start
        samples[1, i] = sum(comm.stats.seconds.values()) if comm is not None else 0.0
    dist.all_reduce(samples[0], op=dist.ReduceOp.MAX)
    dist.all_reduce(samples[1], op=dist.ReduceOp.MIN)
    return min(samples[0].tolist()), min(samples[1].tolist())


def measure(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    out: dict = {"sweep": [], "dispatchers": {}}
    for nbytes in SWEEP_BYTES:
        x = torch.randn(max(world_size, nbytes // 4 // world_size * world_size))
        y = torch.empty_like(x)
        seconds = timed(lambda: dist.all_to_all_single(y, x), args.reps)[0]
        out["sweep"].append((world_size - 1, x.numel() * 4 * (world_size - 1) / world_size, seconds))
    T, D, E, K = args.tokens, args.hidden, args.experts, args.top_k
    g = torch.Generator().manual_seed(rank)
    x_TD = torch.randn(T, D, generator=g)
    torch.manual_seed(0)
    routing = Router(RouterConfig(E, K), D)(x_TD)
    idx_N = torch.randint(0, T, (T * K,), generator=g)
    out["copy_Bps"] = 2 * T * K * D * 4 / timed(lambda: x_TD[idx_N], args.reps)[0]
    table = ExpertPlacement.linear(E, world_size).slot_table()
    for kind in ("all_to_all", "all_gather"):
        comm = EPComm(timeout_s=120)
        disp = AllToAllDispatcher(table, comm) if kind == "all_to_all" else AllGatherDispatcher(table, comm, T)
        dispatch = timed(lambda: disp.dispatch(x_TD, routing), args.reps, comm)
        syncs = comm.stats.host_sync_s / max(comm.stats.host_syncs, 1)
        x_RD, _, meta = disp.dispatch(x_TD, routing)
        y_RD = x_RD.float()
        combine = timed(lambda: disp.combine(y_RD, meta), args.reps, comm)
        rows = torch.tensor([float(x_RD.shape[0]), float(x_RD.shape[0]), syncs])
        dist.all_reduce(rows[:1]), dist.all_reduce(rows[1:], op=dist.ReduceOp.MAX)
        out["dispatchers"][kind] = (dispatch, combine, rows[2].item(), (rows[1] * world_size / rows[0]).item())
    return out


def _worker(rank, world_size, port, args, results_q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    result = measure(rank, world_size, args)
    if rank == 0:
        results_q.put(result)
    dist.barrier()
    dist.destroy_process_group()


def run_world(world_size: int, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, args, results_q)) for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        return results_q.get(timeout=600)
    except queue_mod.Empty:
        raise RuntimeError(f"{world_size} ranks did not report within 600 s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()


def us(seconds: float) -> str:
    return f"{seconds * 1e6:10.0f}"


def print_local(results: dict[int, dict], args: argparse.Namespace) -> None:
    samples = [s for r in results.values() for s in r["sweep"]]
    link = fit_link(samples, "gloo-local (fitted now)")
    print(f"fitted {link.name}: overhead {link.overhead_s * 1e6:.0f} us, latency {link.latency_s * 1e6:.0f} us/peer, "
          f"bandwidth {link.bandwidth_Bps / 1e9:.2f} GB/s   (stored LOCAL_GLOO: {LOCAL_GLOO.overhead_s * 1e6:.0f} us, "
          f"{LOCAL_GLOO.latency_s * 1e6:.0f} us, {LOCAL_GLOO.bandwidth_Bps / 1e9:.2f} GB/s)")
    print("\nraw all_to_all_single, bytes per rank -> measured / predicted us")
    for W, r in results.items():
        predicted = [link.overhead_s + link.transfer_s(p, b) for p, b, _ in r["sweep"]]
        cells = [f"{int(b * W / p) if p else 0:>8}B {s * 1e6:7.0f}/{q * 1e6:<7.0f}"
                 for (p, b, s), q in zip(r["sweep"], predicted, strict=True)]
        print(f"  W={W}: " + " ".join(cells))
    print(f"\ndispatchers, T={args.tokens} tokens/rank, D={args.hidden}, K={args.top_k}, E={args.experts}, fp32, "
          "us; comm = inside collectives (model fitted on the raw sweep only), total = comm + local work")
    print(f"{'W':>3} {'dispatcher':>11} | {'dispatch':>8} {'pred':>6} {'comm':>6} {'pred':>6} | {'combine':>8}"
          f" {'pred':>6} {'comm':>6} {'pred':>6} | {'host sync':>9} {'max/mean R':>10}")
    for W, r in results.items():
        for kind, ((d_total, d_comm), (c_total, c_comm), sync, imbalance) in r["dispatchers"].items():
            step = Step(args.tokens, args.hidden, args.top_k, args.experts // W, 4, 4, imbalance)
            predict = predict_all_to_all if kind == "all_to_all" else predict_all_gather
            p_d, p_c = predict(local_cluster(link, r["copy_Bps"], sync), W, step)
            print(f"{W:>3} {kind:>11} | {d_total * 1e6:8.0f} {p_d.total_s * 1e6:6.0f} {d_comm * 1e6:6.0f}"
                  f" {p_d.comm_s * 1e6:6.0f} | {c_total * 1e6:8.0f} {p_c.total_s * 1e6:6.0f} {c_comm * 1e6:6.0f}"
                  f" {p_c.comm_s * 1e6:6.0f} | {sync * 1e6:9.1f} {imbalance:10.2f}")
    print("local copy bandwidth (one thread, measured): " +
          ", ".join(f"W={W} {r['copy_Bps'] / 1e9:.1f} GB/s" for W, r in results.items()))


def print_predictions() -> None:
    print("\npredicted, H100 nodes (8 GPUs, NVLink) + InfiniBand NDR between nodes; DeepSeek-V3 layer: D=7168, K=8,"
          " 256 experts, fp8 dispatch, bf16 combine, uniform routing")
    print(f"{'EP':>4} {'T/rank':>7} {'a2a dispatch us':>15} {'a2a combine us':>14} {'gather dispatch us':>18}"
          f" {'gather combine us':>17}")
    for T in (128, 4096):
        for W in (8, 16, 32, 64, 128, 256):
            step = Step(T, 7168, 8, 256 // W, dispatch_bytes=1, combine_bytes=2)
            a_d, a_c = predict_all_to_all(H100_NVLINK_IB, W, step)
            g_d, g_c = predict_all_gather(H100_NVLINK_IB, W, step)
            print(f"{W:>4} {T:>7} {us(a_d.total_s):>15} {us(a_c.total_s):>14} {us(g_d.total_s):>18}"
                  f" {us(g_c.total_s):>17}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=12)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    for W in args.ranks:
        if args.experts % W:
            raise ValueError(f"--experts ({args.experts}) must be divisible by every --ranks value ({W})")
    results = {W: run_world(W, args) for W in args.ranks}
    print_local(results, args)
    print_predictions()


if __name__ == "__main__":
    main()
