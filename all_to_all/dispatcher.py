"""The ``Dispatcher`` protocol and ``LocalDispatcher``, the no-parallelism reference every dispatcher matches.

Shape legend: T tokens, D hidden, K top-k, E experts, L experts local to this rank, N = T*K routed rows,
R rows received by this rank after dispatch (R = N without expert parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moe.shuffle import Shuffle, shuffle
from routing.router import Routing


class Dispatcher(Protocol):
    """Moves routed rows to the ranks that own their experts, and the results back.

    ``dispatch(x_TD, routing) -> (x_RD, counts_L, meta)``: rows sorted by local expert, ``counts_L[l]`` rows
    for local expert ``l`` (on the device). ``combine(y_RD, meta) -> y_TD``: weighted sum back in token order.
    When ``routing.apply_on_input`` the weight scales the rows before the experts and ``combine`` only sums.
    """

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, y_RD: torch.Tensor, meta: Any) -> torch.Tensor: ...


@dataclass
class LocalMeta:
    shuffle: Shuffle
    weights_N: torch.Tensor  # fp32 routing weight of each sorted row
    num_tokens: int
    apply_on_input: bool


class LocalDispatcher:
    """All experts are local: dispatch is a gather in expert order, combine an un-permute and a sum over K."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, LocalMeta]:
        shuf = shuffle(routing.ids_TK, self.num_experts)
        weights_N = routing.weights_TK.reshape(-1)[shuf.order_N].float()
        x_ND = x_TD[shuf.token_idx_N]
        if routing.apply_on_input:
            x_ND = (x_ND.float() * weights_N.unsqueeze(1)).to(x_TD.dtype)
        return x_ND, shuf.counts_E, LocalMeta(shuf, weights_N, x_TD.shape[0], routing.apply_on_input)

    def combine(self, y_ND: torch.Tensor, meta: LocalMeta) -> torch.Tensor:
        return unpermute_and_sum(y_ND, meta.shuffle.order_N, meta.weights_N, meta.num_tokens, meta.apply_on_input)


def unpermute_and_sum(
    y_ND: torch.Tensor, order_N: torch.Tensor, weights_N: torch.Tensor, num_tokens: int, apply_on_input: bool
) -> torch.Tensor:
    """``y_TD[t] = sum_k w[t,k] * y[row of (t,k)]`` in fp32, in a fixed order (deterministic, no atomics)."""
    y32_ND = y_ND.float()
    if not apply_on_input:
        y32_ND = y32_ND * weights_N.unsqueeze(1)
    by_pair_ND = torch.empty_like(y32_ND)
    by_pair_ND[order_N] = y32_ND
    return by_pair_ND.view(num_tokens, -1, y_ND.shape[1]).sum(dim=1)
