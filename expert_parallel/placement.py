"""``ExpertPlacement``: logical expert -> physical slot -> rank.

A placement is ``phy2log``, the logical expert held by each physical slot; slot ``p`` lives on rank ``p // S``
(``S`` slots per rank) as its local expert ``p % S``. With redundant slots a logical expert has several
replicas; dispatchers split its rows over them (``all_to_all.slots.assign_slots``).

Shape legend: E logical experts, W ranks, S slots per rank, P = W*S physical slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from all_to_all.slots import SlotTable
from expert_parallel.eplb import rebalance


@dataclass(frozen=True)
class ExpertPlacement:
    """``phy2log[p]``: the logical expert in slot ``p``; rank ``r`` holds slots ``r*S .. r*S + S - 1``.

    Example (E=4, W=2): ``linear`` -> ``(0, 1, 2, 3)`` (rank 0: experts 0, 1); ``round_robin`` ->
    ``(0, 2, 1, 3)`` (rank 0: experts 0, 2); ``balanced([8, 1, 1, 1], 2, num_redundant=2)`` ->
    ``(0, 0, 3, 0, 1, 2)`` (expert 0 in three slots; rank loads 6.33 and 4.67, linear's are 9 and 2).
    """

    phy2log: tuple[int, ...]
    num_experts: int
    num_ranks: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "phy2log", tuple(int(e) for e in self.phy2log))
        SlotTable.from_phy2log(self.phy2log, self.num_experts, self.num_ranks)  # validates

    @classmethod
    def linear(cls, num_experts: int, num_ranks: int) -> ExpertPlacement:
        """Contiguous blocks: rank ``r`` holds experts ``r*E/W .. (r+1)*E/W - 1``."""
        _check_divisible(num_experts, num_ranks)
        return cls(tuple(range(num_experts)), num_experts, num_ranks)

    @classmethod
    def round_robin(cls, num_experts: int, num_ranks: int) -> ExpertPlacement:
        """Strided: rank ``r`` holds experts ``r, r + W, r + 2W, ...``."""
        _check_divisible(num_experts, num_ranks)
        per_rank = num_experts // num_ranks
        return cls(tuple(r + i * num_ranks for r in range(num_ranks) for i in range(per_rank)), num_experts, num_ranks)

    @classmethod
    def balanced(cls, load_E: Sequence[float] | torch.Tensor, num_ranks: int, num_redundant: int = 0,
                 num_groups: int = 1, num_nodes: int = 1) -> ExpertPlacement:
        """EPLB (see :mod:`expert_parallel.eplb`) from a measured per-expert load (tokens per expert)."""
        load = load_E.tolist() if isinstance(load_E, torch.Tensor) else list(load_E)
        return cls(tuple(rebalance(load, num_ranks, num_redundant, num_groups, num_nodes)), len(load), num_ranks)

    @property
    def num_slots(self) -> int:
        return len(self.phy2log)

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    def replica_counts(self) -> list[int]:
        return [self.phy2log.count(e) for e in range(self.num_experts)]

    def local_experts(self, rank: int) -> list[int]:
        """Logical experts of ``rank``'s slots, in local-expert order."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank ({rank}) must be in [0, {self.num_ranks})")
        S = self.slots_per_rank
        return list(self.phy2log[rank * S:(rank + 1) * S])

    def rank_loads(self, load_E: Sequence[float] | torch.Tensor) -> list[float]:
        """Expected load of each rank when each expert's load is split evenly over its replicas."""
        load = load_E.tolist() if isinstance(load_E, torch.Tensor) else list(load_E)
        if len(load) != self.num_experts:
            raise ValueError(f"load_E has {len(load)} entries, expected num_experts ({self.num_experts})")
        counts = self.replica_counts()
        S = self.slots_per_rank
        return [sum(load[e] / counts[e] for e in self.phy2log[r * S:(r + 1) * S]) for r in range(self.num_ranks)]

    def max_over_mean(self, load_E: Sequence[float] | torch.Tensor) -> float:
        """Max rank load / mean rank load (1.0 is perfect; DeepSeek's "balancedness" is the inverse)."""
        loads = self.rank_loads(load_E)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    def slot_table(self, device: torch.device | str | None = None) -> SlotTable:
        return SlotTable.from_phy2log(self.phy2log, self.num_experts, self.num_ranks, device)


def _check_divisible(num_experts: int, num_ranks: int) -> None:
    if num_ranks < 1 or num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_ranks ({num_ranks})")
