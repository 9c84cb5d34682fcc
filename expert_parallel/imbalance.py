"""Routing-imbalance metrics on per-expert token counts (host-side; lists, numpy arrays or torch tensors in).

Shape legend: L layers, E experts, R EP ranks.

Worked example, counts ``[6, 2, 0, 0]``: mean 2, max/mean 3.0; population std 2.449 -> CV 1.225;
shares ``[0.75, 0.25]`` -> entropy 0.562 nats / log(4) -> normalised entropy 0.406; expert 0 is the hottest,
experts 2 and 3 are dead. On 2 ranks, linear placement (rank 0: experts 0, 1) loads ``[8, 0]``: balancedness
(mean/max) 0.5, straggler rank 0; round-robin (rank 0: experts 0, 2) loads ``[6, 2]``: balancedness 0.667.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from expert_parallel.placement import ExpertPlacement

PLACEMENTS = ("linear", "round_robin", "eplb")


def as_counts(counts) -> np.ndarray:
    """float64 numpy copy of counts given as a list, numpy array or (any-device) torch tensor."""
    if hasattr(counts, "detach"):
        counts = counts.detach().cpu().numpy()
    return np.asarray(counts, dtype=np.float64)


# -- per layer (counts_E) ---------------------------------------------------------------------------------------
def max_over_mean(counts_E) -> float:
    """Hottest expert's load / mean load (1.0 is perfect; E when one expert takes everything; 1.0 if empty)."""
    c = as_counts(counts_E)
    mean = c.mean()
    return float(c.max() / mean) if mean > 0 else 1.0


def coefficient_of_variation(counts_E) -> float:
    """Population standard deviation / mean (0 for an even load)."""
    c = as_counts(counts_E)
    mean = c.mean()
    return float(c.std() / mean) if mean > 0 else 0.0


def normalized_entropy(counts_E) -> float:
    """Entropy of the load shares / log(E): 1 for an even load, 0 when one expert takes everything."""
    c = as_counts(counts_E)
    total = c.sum()
    if total == 0 or c.size < 2:
        return 1.0
    p = c[c > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(c.size))


def hottest_experts(counts_E, n: int = 3) -> list[int]:
    """The ``n`` most loaded experts, hottest first (ties: lower id first); experts with no load are left out."""
    c = as_counts(counts_E)
    order = sorted(range(c.size), key=lambda e: (-c[e], e))
    return [e for e in order[:n] if c[e] > 0]


def dead_experts(counts_E) -> list[int]:
    """Experts that received no tokens."""
    return [int(e) for e in np.flatnonzero(as_counts(counts_E) == 0)]


# -- per EP rank ------------------------------------------------------------------------------------------------
def rank_loads(counts_E, placement: ExpertPlacement) -> np.ndarray:
    """``[R]`` tokens each rank computes; an expert's tokens are split evenly over its replicas."""
    return np.asarray(placement.rank_loads(as_counts(counts_E).tolist()), dtype=np.float64)


def balancedness(loads_R) -> float:
    """Mean / max rank load (DeepSeek EPLB's figure: 1.0 is perfect, 1/R when one rank does everything)."""
    loads = as_counts(loads_R)
    peak = loads.max()
    return float(loads.mean() / peak) if peak > 0 else 1.0


def straggler(loads_R) -> int:
    """The most loaded rank (the one every step waits for); ties: the lowest rank."""
    return int(np.argmax(as_counts(loads_R)))


def make_placement(kind: str, counts_E, ep_size: int, num_redundant: int = 0) -> ExpertPlacement:
    """``linear`` / ``round_robin`` (need ``E % ep_size == 0``) or ``eplb`` (load-balanced from ``counts_E`` with
    ``num_redundant`` replica slots: needs ``(E + num_redundant) % ep_size == 0``). Misfits raise ``ValueError``."""
    E = as_counts(counts_E).size
    if kind == "linear":
        return ExpertPlacement.linear(E, ep_size)
    if kind == "round_robin":
        return ExpertPlacement.round_robin(E, ep_size)
    if kind == "eplb":
        return ExpertPlacement.balanced(as_counts(counts_E).tolist(), ep_size, num_redundant)
    raise ValueError(f"placement ({kind!r}) must be one of {', '.join(PLACEMENTS)}")


# -- summaries --------------------------------------------------------------------------------------------------
@dataclass
class LayerLoad:
    """Imbalance of one layer. ``routed`` counts (token, expert) pairs, i.e. tokens x top-k."""

    name: str
    routed: int
    max_over_mean: float
    cv: float
    normalized_entropy: float
    hottest: list[int]
    hottest_share: list[float]  # share of the layer's routed tokens, per hottest expert
    dead: list[int]

    @classmethod
    def of(cls, name: str, counts_E, num_hottest: int = 3) -> LayerLoad:
        c = as_counts(counts_E)
        total = c.sum()
        hot = hottest_experts(c, num_hottest)
        return cls(name, int(total), max_over_mean(c), coefficient_of_variation(c), normalized_entropy(c), hot,
                   [float(c[e] / total) for e in hot], dead_experts(c))


@dataclass
class EpLoad:
    """One EP size and placement kind, every layer placed by it (``eplb``: from each layer's own load).

    ``loads`` sums the ranks' tokens over layers. Each layer waits for its own straggler, so the figure that
    predicts MoE step time is ``step_balancedness`` = sum over layers of the mean rank load / sum over layers of
    the max rank load (ideal time / straggler time), not the balancedness of the summed loads.
    """

    ep_size: int
    placement: str
    num_redundant: int
    loads: list[float]  # [R] tokens per rank, summed over layers
    balancedness: float  # of `loads`
    straggler: int  # of `loads`
    step_balancedness: float
    layer_balancedness: list[float]  # [L]
    layer_stragglers: list[int]  # [L]
    phy2log: list[list[int]]  # [L][slots]: the placement of each layer

    @classmethod
    def of(cls, counts_LE, ep_size: int, kind: str, num_redundant: int = 0) -> EpLoad:
        counts = as_counts(counts_LE)
        redundant = num_redundant if kind == "eplb" else 0
        placements = [make_placement(kind, c, ep_size, redundant) for c in counts]
        per_layer = np.stack([rank_loads(c, p) for c, p in zip(counts, placements, strict=True)])  # [L, R]
        loads = per_layer.sum(axis=0)
        peak = per_layer.max(axis=1).sum()
        step = float(per_layer.mean(axis=1).sum() / peak) if peak > 0 else 1.0
        return cls(ep_size, kind, redundant, loads.tolist(), balancedness(loads), straggler(loads), step,
                   [balancedness(r) for r in per_layer], [straggler(r) for r in per_layer],
                   [list(p.phy2log) for p in placements])


@dataclass
class EplbAdvice:
    """EPLB with ``num_redundant`` replica slots at one EP size vs the ``baseline`` (linear, if it fits).

    Balancedness is predicted in-sample (the placement is fitted to the same counts it is scored on).
    Replica memory: ``num_redundant`` extra experts per layer, spread evenly, ``expert_bytes`` each.
    """

    ep_size: int
    num_redundant: int
    eplb: EpLoad
    baseline: EpLoad | None
    expert_bytes: int | None
    num_layers: int

    @property
    def predicted_speedup(self) -> float | None:
        """Baseline MoE time / EPLB MoE time, when each layer's time is its straggler's token count."""
        if self.baseline is None:
            return None
        return self.eplb.step_balancedness / self.baseline.step_balancedness

    @property
    def replica_bytes(self) -> int | None:
        return None if self.expert_bytes is None else self.expert_bytes * self.num_redundant * self.num_layers

    @property
    def replica_bytes_per_rank(self) -> int | None:
        return None if self.replica_bytes is None else self.replica_bytes // self.ep_size

    def to_dict(self) -> dict:
        return {"ep_size": self.ep_size, "num_redundant": self.num_redundant,
                "baseline": None if self.baseline is None else self.baseline.placement,
                "baseline_step_balancedness": None if self.baseline is None else self.baseline.step_balancedness,
                "predicted_step_balancedness": self.eplb.step_balancedness,
                "predicted_balancedness": self.eplb.balancedness, "predicted_speedup": self.predicted_speedup,
                "expert_bytes": self.expert_bytes, "replica_bytes": self.replica_bytes,
                "replica_bytes_per_rank": self.replica_bytes_per_rank, "phy2log": self.eplb.phy2log}


def default_redundant(num_experts: int, ep_size: int) -> int:
    """Fewest replica slots (>= 1) that make ``E + N`` divide over ``ep_size`` ranks: one per rank when ``E``
    already divides (``E=8, W=4 -> 4``), else the remainder's complement (``E=6, W=4 -> 2``)."""
    return (-num_experts) % ep_size or ep_size


def ep_loads(counts_LE, ep_size: int, num_redundant: int | None = None, expert_bytes: int | None = None
             ) -> tuple[list[EpLoad], EplbAdvice]:
    """Every placement that fits ``ep_size``: ``linear`` and ``round_robin`` when ``E % ep_size == 0``, and
    ``eplb`` with ``num_redundant`` slots (None: :func:`default_redundant`), with the EPLB advice.
    ``ValueError`` (placement.py's message) when EPLB does not fit."""
    counts = as_counts(counts_LE)
    E = counts.shape[1]
    redundant = default_redundant(E, ep_size) if num_redundant is None else num_redundant
    eplb = EpLoad.of(counts, ep_size, "eplb", redundant)
    plain = [] if E % ep_size else [EpLoad.of(counts, ep_size, k) for k in ("linear", "round_robin")]
    advice = EplbAdvice(ep_size, redundant, eplb, plain[0] if plain else None, expert_bytes, counts.shape[0])
    return plain + [eplb], advice
