"""Expert activations on the first projection's output ``h13`` (gate rows then up rows when gated)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe.config import Activation


def expert_activation(
    h13: torch.Tensor, activation: Activation, dim: int = -1, alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """``[.., 2F]`` (gated) or ``[.., F]`` along ``dim`` -> ``[.., F]``.

    ``dim`` lets the CPU path work on transposed blocks (``h_2FM``) without a copy.
    """
    if not activation.gated:
        return F.gelu(h13) if activation is Activation.GELU else F.relu(h13)
    gate, up = h13.chunk(2, dim=dim)
    if activation is Activation.SWIGLU:
        return F.silu(gate) * up
    if activation is Activation.GEGLU:
        return F.gelu(gate) * up
    # gpt-oss: gate clamped from above, up clamped both ways, "+1" on up.
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)
