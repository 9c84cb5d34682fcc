"""The shared (always-on) expert, with Qwen2-MoE's optional sigmoid gate."""

from __future__ import annotations

import torch
from torch import nn

from moe.activations import expert_activation
from moe.config import Activation


class SharedExpert(nn.Module):
    """A dense MLP applied to every token: ``w13_XD`` ``[X, D]`` (gate then up rows when gated), ``w2_DS``.

    With ``gated_output`` a ``gate_weight`` ``[1, D]`` scales the result by ``sigmoid(x . gate_weight)``.
    ``alpha`` / ``limit``: the clamped GLUs' parameters (``SWIGLU_OAI``, ``SWIGLU_CLAMPED``), as the routed experts
    have them; ``softcaps`` those of ``SWIGLU_SOFTCAPPED``.
    """

    def __init__(self, hidden_size: int, ffn_size: int, activation: Activation, gated_output: bool,
                 alpha: float = 1.702, limit: float = 7.0, softcaps: tuple[float, float] = (4.0, 25.0)) -> None:
        super().__init__()
        self.activation = Activation(activation)
        self.alpha, self.limit, self.softcaps = alpha, limit, softcaps
        rows = 2 * ffn_size if self.activation.gated else ffn_size
        self.w13_XD = nn.Parameter(torch.empty(rows, hidden_size))
        self.w2_DS = nn.Parameter(torch.empty(hidden_size, ffn_size))
        nn.init.normal_(self.w13_XD, std=hidden_size**-0.5)
        nn.init.normal_(self.w2_DS, std=ffn_size**-0.5)
        self.gate_weight = nn.Parameter(torch.zeros(1, hidden_size)) if gated_output else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD.to(self.w13_XD.dtype)
        # Transposed products (w @ x.T): MKL's fastest form for [out, in] weights and few rows.
        h_XT = torch.mm(self.w13_XD, x_TD.t())
        y_TD = torch.mm(self.w2_DS, expert_activation(h_XT, self.activation, 0, self.alpha, self.limit,
                                                           self.softcaps)).t()
        if self.gate_weight is not None:
            y_TD = y_TD * torch.sigmoid(torch.mm(x_TD, self.gate_weight.t()))
        return y_TD
