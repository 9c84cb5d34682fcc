"""Expert activations on the first projection's output ``h13`` (gate rows then up rows when gated), and
:class:`ActivationSpec`, the activation with its parameters as one value."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe.config import Activation, MoEConfig


def expert_activation(
    h13: torch.Tensor, activation: Activation, dim: int = -1, alpha: float = 1.702, limit: float = 7.0,
    softcaps: tuple[float, float] = (4.0, 25.0),
) -> torch.Tensor:
    """``[.., 2F]`` (gated) or ``[.., F]`` along ``dim`` -> ``[.., F]``.

    ``dim`` lets the CPU path work on transposed blocks (``h_2FM``) without a copy. ``softcaps``: the gate's and
    up's of ``SWIGLU_SOFTCAPPED``.
    """
    if not activation.gated:
        if activation is Activation.RELU2:
            return F.relu(h13).square()
        return F.gelu(h13) if activation is Activation.GELU else F.relu(h13)
    gate, up = h13.chunk(2, dim=dim)
    if activation is Activation.SWIGLU_SOFTCAPPED:
        return _softcapped_swiglu(gate, up, *softcaps)
    if activation is Activation.SWIGLU:
        return F.silu(gate) * up
    if activation is Activation.GEGLU:
        return F.gelu(gate) * up
    if activation is Activation.SWIGLU_CLAMPED:  # clamped in a copy, so silu sees the in-place form's strided
        gate, up = h13.clone().chunk(2, dim=dim)  # layout (silu rounds differently on contiguous input)
        return F.silu(gate.clamp_(max=limit), inplace=True).mul_(up.clamp_(min=-limit, max=limit))
    # gpt-oss: gate clamped from above, up clamped both ways, "+1" on up.
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


def expert_activation_(
    h13_RX: torch.Tensor, activation: Activation, alpha: float = 1.702, limit: float = 7.0,
    softcaps: tuple[float, float] = (4.0, 25.0),
) -> torch.Tensor:
    """:func:`expert_activation` along the last dim computed in place: overwrites ``h13_RX`` and returns a view of
    it (gated: the gate half, row stride 2F), so a large block needs no new ``[R, F]`` buffers. Same values as
    the out-of-place form (the same elementwise ops, rounded the same way)."""
    if not activation.gated:
        if activation is Activation.RELU2:
            return F.relu_(h13_RX).square_()
        return torch.ops.aten.gelu.out(h13_RX, out=h13_RX) if activation is Activation.GELU else F.relu_(h13_RX)
    gate, up = h13_RX.chunk(2, dim=-1)
    if activation is Activation.SWIGLU_SOFTCAPPED:  # needs the raw gate twice: out of place, copied back
        return gate.copy_(_softcapped_swiglu(gate, up, *softcaps))
    if activation is Activation.SWIGLU:
        return F.silu(gate, inplace=True).mul_(up)
    if activation is Activation.GEGLU:
        return torch.ops.aten.gelu.out(gate, out=gate).mul_(up)
    if activation is Activation.SWIGLU_CLAMPED:
        return F.silu(gate.clamp_(max=limit), inplace=True).mul_(up.clamp_(min=-limit, max=limit))
    gate.clamp_(max=limit)
    up.clamp_(min=-limit, max=limit).add_(1)
    return gate.mul_(torch.sigmoid(gate * alpha)).mul_(up)


def _softcapped_swiglu(gate: torch.Tensor, up: torch.Tensor, gate_softcap: float, up_softcap: float) -> torch.Tensor:
    """Inkling 2's GLU: the sigmoid sees the raw gate, the softcaps (``c tanh(x / c)``) bound the linear gate
    factor and ``up``."""
    capped_gate = torch.tanh(gate / gate_softcap) * gate_softcap
    return capped_gate * torch.sigmoid(gate) * (torch.tanh(up / up_softcap) * up_softcap)


@dataclass(frozen=True)
class ActivationSpec:
    """An expert activation and its parameters (gpt-oss's ``alpha`` and ``limit``, Inkling 2's ``softcaps``),
    passed around as one value.

    ``spec(h13, dim)`` is :func:`expert_activation`; ``spec.in_place(h13_RX)`` is :func:`expert_activation_`.
    """

    activation: Activation = Activation.SWIGLU
    alpha: float = 1.702
    limit: float = 7.0
    softcaps: tuple[float, float] = (4.0, 25.0)

    @classmethod
    def of(cls, config: MoEConfig) -> ActivationSpec:
        return cls(config.activation, config.swiglu_alpha, config.swiglu_limit,
                   (config.swiglu_gate_softcap, config.swiglu_up_softcap))

    def __call__(self, h13: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return expert_activation(h13, self.activation, dim, self.alpha, self.limit, self.softcaps)

    def in_place(self, h13_RX: torch.Tensor) -> torch.Tensor:
        return expert_activation_(h13_RX, self.activation, self.alpha, self.limit, self.softcaps)
