"""``AllGatherDispatcher``: static shapes, no host sync, CUDA-graph capturable; ``W`` times the traffic.

dispatch: every rank all-gathers every rank's tokens (padded to ``max_tokens``) with their slots and weights,
keeps the rows of its own slots sorted by local expert, and leaves the others behind them (never computed).
combine: each rank sums its experts' weighted outputs per gathered token, returns each source rank its
tokens' partial sums with one equal-split ``all_to_all_single``, and every rank adds the ``W`` partials in
rank order (deterministic). Every collective has a fixed size, so nothing reads counts on the host.

Shape legend: T tokens, M = max_tokens (padded tokens per rank), D hidden, K top-k, W ranks, S slots per rank,
G = W*M gathered tokens, R = G*K gathered rows (static; only ``sum(counts_S)`` of them are this rank's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from all_to_all.comm import CommStats, EPComm
from all_to_all.dispatcher import inverse_permutation, weighted_sum
from all_to_all.slots import SlotTable, assign_slots
from routing.router import Routing


@dataclass
class AllGatherMeta:
    position_R: torch.Tensor  # sorted position of flat gathered row g*K + k
    weights_R: torch.Tensor  # fp32 routing weight of each sorted row
    mine_R: torch.Tensor  # bool: the row belongs to one of this rank's slots (these come first)
    num_tokens: int  # T of this rank
    padded_tokens: int  # M
    apply_on_input: bool


class AllGatherDispatcher:
    """Static-shape dispatcher. ``max_tokens``: the padded tokens per rank ``M``; every rank must pass the same.

    With ``max_tokens=None`` ``M`` is the largest ``T`` over the ranks, found with an all-reduce whose result is
    read on the host (a host sync; pass ``max_tokens`` for the sync-free, graph-capturable path).
    ``routing.apply_on_input`` scales the rows after the gather (a token travels once, not once per expert):
    the same fp32 multiply as ``LocalDispatcher``, so the rows are bit-identical.
    """

    def __init__(self, table: SlotTable, comm: EPComm, max_tokens: int | None = None) -> None:
        if table.num_ranks != comm.world_size:
            raise ValueError(f"table.num_ranks ({table.num_ranks}) must equal the group size ({comm.world_size})")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens ({max_tokens}) must be >= 1 or None")
        self.table = table
        self.comm = comm
        self.max_tokens = max_tokens

    @property
    def stats(self) -> CommStats:
        return self.comm.stats

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, AllGatherMeta]:
        W, S, rank = self.table.num_ranks, self.table.slots_per_rank, self.comm.rank
        (T, K), D = routing.ids_TK.shape, x_TD.shape[1]
        M = self._padded_tokens(T, x_TD.device)
        # 1. this rank's tokens padded to M; padding rows go to slot -1, which no rank owns
        x_MD = x_TD.new_zeros(M, D)
        x_MD[:T] = x_TD
        slots_and_weights_MK2 = torch.zeros(M, K, 2, dtype=torch.int32, device=x_TD.device)  # weight 0.0: bits 0
        slots_and_weights_MK2[:, :, 0] = -1
        slots_and_weights_MK2[:T, :, 0] = assign_slots(routing.ids_TK, self.table, rank).to(torch.int32)
        slots_and_weights_MK2[:T, :, 1] = routing.weights_TK.float().view(torch.int32)  # fp32 bits ride along
        # 2. everyone's tokens, slots and weights: G = W*M gathered tokens
        x_GD = x_TD.new_empty(W * M, D)
        self.comm.all_gather(x_GD, x_MD, label="dispatch")
        gathered_GK2 = slots_and_weights_MK2.new_empty(W * M, K, 2)
        self.comm.all_gather(gathered_GK2, slots_and_weights_MK2, label="dispatch_routing")
        # 3. my slots' rows first, sorted by local expert; every other row sorts behind them (key S)
        local_N = gathered_GK2[..., 0].reshape(-1).long() - rank * S
        mine_N = (local_N >= 0) & (local_N < S)
        key_N = torch.where(mine_N, local_N, S)
        key_R, order_R = torch.sort(key_N, stable=True)
        counts_S1 = torch.zeros(S + 1, dtype=torch.int32, device=x_TD.device)
        counts_S1.scatter_add_(0, key_N, torch.ones_like(key_N, dtype=torch.int32))
        weights_R = gathered_GK2[..., 1].reshape(-1)[order_R].view(torch.float32)
        x_RD = x_GD.index_select(0, order_R // K)
        if routing.apply_on_input:
            x_RD = (x_RD.float() * weights_R.unsqueeze(1)).to(x_TD.dtype)
        meta = AllGatherMeta(inverse_permutation(order_R), weights_R, key_R < S, T, M, routing.apply_on_input)
        return x_RD, counts_S1[:S], meta

    def combine(self, y_RD: torch.Tensor, meta: AllGatherMeta) -> torch.Tensor:
        W, M, D = self.table.num_ranks, meta.padded_tokens, y_RD.shape[1]
        # rows past sum(counts_S) were never computed and may hold anything: zero them, not multiply by 0
        y32_RD = torch.where(meta.mine_R.unsqueeze(1), y_RD.float(), 0.0)
        weights_R = torch.where(meta.mine_R, meta.weights_R, 0.0)
        partial_GD = weighted_sum(y32_RD, meta.position_R, weights_R, W * M, meta.apply_on_input)
        recv_WMD = torch.empty_like(partial_GD)
        self.comm.all_to_all(recv_WMD, partial_GD, label="combine")
        return recv_WMD.view(W, M, D).sum(0)[: meta.num_tokens]

    def _padded_tokens(self, num_tokens: int, device: torch.device) -> int:
        if self.max_tokens is not None:
            if num_tokens > self.max_tokens:
                raise ValueError(f"num_tokens ({num_tokens}) exceeds max_tokens ({self.max_tokens})")
            return self.max_tokens
        most_1 = self.comm.all_reduce_max(torch.tensor([num_tokens], device=device), label="max_tokens")
        return self.comm.to_host(most_1)[0]  # NOTE: host sync (pass max_tokens to avoid it)
