"""``SlotTable``: where each logical expert's replicas live, and ``assign_slots``: which replica a routed row uses.

Physical slot ``p`` lives on rank ``p // S`` as that rank's local expert ``p % S`` (``S`` slots per rank). A
logical expert may have several replicas (redundant slots, EPLB); its rows are split over them round-robin in
a fixed order, so every rank and every dispatcher makes the same choice.

Shape legend: T tokens, K top-k, E logical experts, X most replicas of one expert, P = W*S physical slots,
N = T*K routed rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe.shuffle import shuffle


@dataclass(frozen=True)
class SlotTable:
    """A placement in tensor form.

    ``replicas_EX`` (int64 ``[E, X]``): the slots of expert ``e`` in columns ``0..counts_E[e]-1``, then -1.
    ``counts_E`` (int64 ``[E]``): replicas per expert. ``slot_to_expert_P`` (int64 ``[P]``): logical expert of
    each slot. Build it with :meth:`from_phy2log` (``expert_parallel.ExpertPlacement.slot_table`` does).
    """

    replicas_EX: torch.Tensor
    counts_E: torch.Tensor
    slot_to_expert_P: torch.Tensor
    num_ranks: int
    slots_per_rank: int

    @classmethod
    def from_phy2log(cls, phy2log: Sequence[int], num_experts: int, num_ranks: int,
                     device: torch.device | str | None = None) -> SlotTable:
        P = len(phy2log)
        if num_ranks < 1 or P % num_ranks:
            raise ValueError(f"number of slots ({P}) must be a positive multiple of num_ranks ({num_ranks})")
        bad = [e for e in phy2log if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"phy2log holds experts outside [0, {num_experts}): {bad[:5]}")
        slots_of = [[p for p, e in enumerate(phy2log) if e == expert] for expert in range(num_experts)]
        missing = [e for e, s in enumerate(slots_of) if not s]
        if missing:
            raise ValueError(f"experts {missing[:5]} have no slot in phy2log")
        X = max(len(s) for s in slots_of)
        replicas_EX = torch.tensor([s + [-1] * (X - len(s)) for s in slots_of], dtype=torch.int64, device=device)
        counts_E = torch.tensor([len(s) for s in slots_of], dtype=torch.int64, device=device)
        slot_to_expert_P = torch.tensor(list(phy2log), dtype=torch.int64, device=device)
        return cls(replicas_EX, counts_E, slot_to_expert_P, num_ranks, P // num_ranks)

    @property
    def num_experts(self) -> int:
        return self.replicas_EX.shape[0]

    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.slots_per_rank

    def to(self, device: torch.device | str) -> SlotTable:
        return SlotTable(self.replicas_EX.to(device), self.counts_E.to(device), self.slot_to_expert_P.to(device),
                         self.num_ranks, self.slots_per_rank)


def assign_slots(ids_TK: torch.Tensor, table: SlotTable, source_rank: int) -> torch.Tensor:
    """The physical slot (int64 ``[T, K]``) of each routed row; no host synchronisation.

    The ``j``-th row (in token order) that source rank ``r`` routes to expert ``e`` goes to replica
    ``(j + r) % counts_E[e]``: an even split within a rank, and ranks with one token start on different replicas.

    Example: 2 ranks x 2 slots, ``phy2log = [0, 1, 2, 0]`` (expert 0 in slots 0 and 3),
    ``ids_TK = [[0, 1], [0, 2], [0, 1]]`` -> from rank 0 ``[[0, 1], [3, 2], [0, 1]]``,
    from rank 1 ``[[3, 1], [0, 2], [3, 1]]``.
    """
    ids_TK = ids_TK.long()
    if table.replicas_EX.shape[1] == 1:
        return table.replicas_EX[ids_TK, 0]
    shuf = shuffle(ids_TK, table.num_experts)
    expert_of_N = shuf.expert_of_N.long()
    position_N = torch.arange(expert_of_N.numel(), device=ids_TK.device) - shuf.offsets_E1[expert_of_N]
    replica_N = (position_N + source_rank) % table.counts_E[expert_of_N]
    slot_N = torch.empty_like(expert_of_N)
    slot_N[shuf.order_N] = table.replicas_EX[expert_of_N, replica_N]
    return slot_N.view(ids_TK.shape)
