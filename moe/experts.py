"""``Experts``: the routed experts' fused weights and their grouped FFN.

Shape legend: E experts, D hidden, F expert FFN size, X = 2F (gated) or F rows of the first projection,
R routed rows sorted by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from moe.activations import ActivationSpec
from moe.backends import grouped_ffn_for
from moe.config import MoEConfig


class Experts(nn.Module):
    """``Experts(config)(x_RD, counts_E) -> y_RD``.

    Weights are fused and ``[out, in]``: ``w13_E2FD`` ``[E, X, D]`` (gate rows then up rows when gated) and
    ``w2_EDF`` ``[E, D, F]``; optional biases ``b13_E2F`` ``[E, X]`` and ``b2_ED`` ``[E, D]``. Rows of
    ``x_RD`` must be sorted by expert with ``counts_E[e]`` rows for expert ``e`` (zero is fine).
    """

    b13_E2F: nn.Parameter | None
    b2_ED: nn.Parameter | None

    def __init__(self, config: MoEConfig, num_local_experts: int | None = None) -> None:
        super().__init__()
        self.config = config
        E = config.num_experts if num_local_experts is None else num_local_experts
        D, F, X = config.hidden_size, config.ffn_size, config.w13_rows
        self.w13_E2FD = nn.Parameter(torch.empty(E, X, D))
        self.w2_EDF = nn.Parameter(torch.empty(E, D, F))
        nn.init.normal_(self.w13_E2FD, std=D**-0.5)
        nn.init.normal_(self.w2_EDF, std=F**-0.5)
        if config.expert_bias:
            self.b13_E2F = nn.Parameter(torch.zeros(E, X))
            self.b2_ED = nn.Parameter(torch.zeros(E, D))
        else:
            self.b13_E2F = self.b2_ED = None

    @property
    def num_experts(self) -> int:
        return self.w13_E2FD.shape[0]

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if x_RD.shape[-1] != self.w13_E2FD.shape[-1]:
            raise ValueError(f"x_RD hidden size ({x_RD.shape[-1]}) does not match w13_E2FD "
                             f"{tuple(self.w13_E2FD.shape)}")
        return grouped_ffn_for(x_RD.device)(x_RD, counts_E, self.w13_E2FD, self.w2_EDF,
                                            ActivationSpec.of(self.config), self.b13_E2F, self.b2_ED)
