"""Communication cost model for EP dispatch and combine: per-message latency + bytes / bandwidth per link type.

One collective on ``W`` ranks, each handing ``b`` bytes to it and exchanging with ``p`` peers over a link, costs

    t = overhead + p * latency + b_link / bandwidth

``b_link`` counts the bytes a rank sends over that link (to itself is a local copy). A rank's peers on its node
use the ``intra`` link, the others the ``inter`` link, concurrently: the slower one sets the time. Skew enters
as ``imbalance`` (max / mean rows per rank), which scales the busiest rank's bytes.

Links: ``NVLINK_H100`` and ``INFINIBAND_NDR`` are vendor figures (below), not measured here; ``LOCAL_GLOO``
was fitted by ``benchmarks/ep.py`` on this machine (gloo over loopback TCP, 2 CPU cores) and is what the
benchmark compares against measurements. ``fit_link`` refits it from ``(peers, bytes, seconds)`` samples.

Shape legend: T tokens per rank, D hidden, K top-k, W ranks, S slots per rank, N = T*K rows sent per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Link:
    """``overhead_s`` per collective call, ``latency_s`` per peer message, ``bandwidth_Bps`` per rank, one way."""

    name: str
    overhead_s: float
    latency_s: float
    bandwidth_Bps: float

    def transfer_s(self, peers: int, nbytes: float) -> float:
        return peers * self.latency_s + nbytes / self.bandwidth_Bps if peers else 0.0


# H100 SXM NVLink 4: 18 links x 25 GB/s = 450 GB/s per direction; NCCL all-to-all reaches ~80% of it.
NVLINK_H100 = Link("nvlink", overhead_s=10e-6, latency_s=1.5e-6, bandwidth_Bps=0.8 * 450e9)
# ConnectX-7 NDR 400 Gb/s = 50 GB/s per GPU's NIC; DeepEP reports 43-58 GB/s RDMA in practice.
INFINIBAND_NDR = Link("infiniband", overhead_s=15e-6, latency_s=3e-6, bandwidth_Bps=45e9)
# Fitted by benchmarks/ep.py on this machine (2 CPU cores shared with other users, gloo over loopback TCP,
# 2-4 ranks, best of 20 at load average ~3). Scheduling dominates and varies with the other users' load: over
# five runs the fit gave 430-950 us/peer and 0.46-0.93 GB/s (overhead always ~0, absorbed by the latency).
LOCAL_GLOO = Link("gloo-local", overhead_s=0.0, latency_s=430e-6, bandwidth_Bps=0.93e9)


@dataclass(frozen=True)
class Cluster:
    """``gpus_per_node`` ranks share the ``intra`` link; ranks on other nodes are reached over ``inter``.

    ``host_sync_s``: one device-to-host read of the split sizes (AllToAll dispatch only).
    ``copy_Bps``: local memory bandwidth for the gathers and permutations around the exchange.
    """

    intra: Link
    inter: Link
    gpus_per_node: int
    host_sync_s: float
    copy_Bps: float

    def exchange_s(self, world_size: int, nbytes: float, imbalance: float = 1.0) -> float:
        """One ``all_to_all_single`` in which every rank hands over ``nbytes`` spread evenly over the ranks."""
        local = min(world_size, self.gpus_per_node)
        share = nbytes * imbalance / world_size
        intra = self.intra.transfer_s(local - 1, share * (local - 1))
        inter = self.inter.transfer_s(world_size - local, share * (world_size - local))
        return (self.inter if inter > intra else self.intra).overhead_s + max(intra, inter)

    def gather_s(self, world_size: int, nbytes: float) -> float:
        """``all_gather`` of ``nbytes`` per rank: every rank receives the other ranks' ``nbytes``."""
        return self.exchange_s(world_size, nbytes * world_size)


H100_NVLINK_IB = Cluster(NVLINK_H100, INFINIBAND_NDR, gpus_per_node=8, host_sync_s=20e-6, copy_Bps=2.5e12)


@dataclass(frozen=True)
class Step:
    """One MoE layer's exchange on each rank: ``T`` tokens of width ``D``, top-``K``, ``S`` slots per rank."""

    tokens: int
    hidden: int
    top_k: int
    slots_per_rank: int
    dispatch_bytes: int = 2  # element size of x on the wire (1 for fp8)
    combine_bytes: int = 4  # element size of the expert outputs
    imbalance: float = 1.0  # max / mean rows received per rank


@dataclass(frozen=True)
class PhaseCost:
    """One dispatch or combine: time inside collectives, and local work (host sync, gathers, permutations)."""

    comm_s: float
    local_s: float

    @property
    def total_s(self) -> float:
        return self.comm_s + self.local_s


def predict_all_to_all(cluster: Cluster, world_size: int, step: Step) -> tuple[PhaseCost, PhaseCost]:
    """``(dispatch, combine)`` of ``AllToAllDispatcher``."""
    N, D, W = step.tokens * step.top_k, step.hidden, world_size
    counts = cluster.exchange_s(W, W * step.slots_per_rank * 4)
    payload = cluster.exchange_s(W, N * D * step.dispatch_bytes, step.imbalance)
    # gather N rows, then regroup the R ~= N * imbalance received rows (each read and written)
    copies = 2 * (1 + step.imbalance) * N * D * step.dispatch_bytes / cluster.copy_Bps
    dispatch = PhaseCost(counts + payload, cluster.host_sync_s + copies)
    # un-regroup R rows; weighted sum reads N rows and writes T
    combine_copies = (2 * step.imbalance + 2) * N * D * step.combine_bytes / cluster.copy_Bps
    combine = PhaseCost(cluster.exchange_s(W, N * D * step.combine_bytes, step.imbalance), combine_copies)
    return dispatch, combine


def predict_all_gather(cluster: Cluster, world_size: int, step: Step) -> tuple[PhaseCost, PhaseCost]:
    """``(dispatch, combine)`` of ``AllGatherDispatcher`` with ``max_tokens = T`` (no host sync)."""
    T, D, K, W = step.tokens, step.hidden, step.top_k, world_size
    gathers = cluster.gather_s(W, T * D * step.dispatch_bytes) + cluster.gather_s(W, T * K * 8)
    dispatch = PhaseCost(gathers, 2 * W * T * K * D * step.dispatch_bytes / cluster.copy_Bps)
    # masked fp32 rows, the per-token partial sums, then the W partials summed (fp32 throughout)
    combine = PhaseCost(cluster.exchange_s(W, W * T * D * 4), (3 * W * T * K + 2 * W * T) * D * 4 / cluster.copy_Bps)
    return dispatch, combine


def local_cluster(link: Link = LOCAL_GLOO, copy_Bps: float = 5e9, host_sync_s: float = 2e-6) -> Cluster:
    """This machine: every rank on one node, over ``link``."""
    return Cluster(link, link, gpus_per_node=1 << 30, host_sync_s=host_sync_s, copy_Bps=copy_Bps)


def fit_link(samples: Sequence[tuple[int, float, float]], name: str = "fitted") -> Link:
    """Least-squares ``Link`` from ``(peers, bytes sent to peers, seconds)`` samples, in relative error.

    Each sample weighs ``1 / seconds`` so that small messages (latency) count as much as large ones.
    Coefficients are clipped at a floor (a negative latency would be unphysical).
    """
    arr = np.asarray(samples, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 3:
        raise ValueError(f"samples ({arr.shape[0] if arr.ndim == 2 else arr.shape}) must be >= 3 (peers, bytes, s)")
    peers, nbytes, seconds = arr.T
    A = np.stack([np.ones_like(peers), peers, nbytes], axis=1) / seconds[:, None]
    coef, *_ = np.linalg.lstsq(A, np.ones_like(seconds), rcond=None)
    overhead, latency, inv_bw = np.maximum(coef, [0.0, 0.0, 1e-15])
    return Link(name, float(overhead), float(latency), float(1.0 / inv_bw))
