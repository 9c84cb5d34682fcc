"""Rotary tables: HF "default", linear, Llama 3 and YaRN RoPE, as ``transformers`` computes
them, and the interleaved-pair rotation DeepSeek's MLA uses.

Shape legend: P positions, R rotary dims (even), T tokens, H heads.
"""

from __future__ import annotations

import math

import torch

from serve.models.config import RopeScaling, YarnRope


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """DeepSeek's YaRN magnitude correction: ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, theta: float, yarn: YarnRope) -> tuple[torch.Tensor, float]:
    """(inverse frequencies ``[R/2]``, attention factor) of ``transformers``' ``_compute_yarn_parameters``."""
    factor = yarn.factor
    attention_factor = yarn.attention_factor
    if attention_factor is None:
        if yarn.mscale and yarn.mscale_all_dim:
            attention_factor = yarn_mscale(factor, yarn.mscale) / yarn_mscale(factor, yarn.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Linear: every frequency / factor. Llama 3: wavelengths longer than ``original / low_freq_factor`` / factor,
    shorter than ``original / high_freq_factor`` kept, the band between interpolated."""
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    original, low, high = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(dim: int, theta: float, max_positions: int, yarn: YarnRope | None = None,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos_PR``, ``sin_PR``: the half-frequencies repeated twice, times YaRN's attention factor (as
    ``transformers``' rotary embeddings return them)."""
    if yarn is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if scaling is not None:
            inv_freq = scaled_inv_freq(inv_freq, scaling)
        scale = 1.0
    else:
        inv_freq, scale = yarn_inv_freq(dim, theta, yarn)
    freqs_PF = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb_PR = torch.cat((freqs_PF, freqs_PF), dim=-1)
    return emb_PR.cos() * scale, emb_PR.sin() * scale


def apply_rope_interleaved(x_THR: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """RoPE on the pairs ``(x0, x1), (x2, x3), ...``, returned de-interleaved (the rotated even dims, then the odd
    ones), exactly as ``transformers``' ``apply_rotary_pos_emb_interleave``: keys and queries get the same layout,
    so their dot products are those of the interleaved rotation."""
    half = cos_TR.shape[-1] // 2
    cos, sin = cos_TR[:, None, :half], sin_TR[:, None, :half]
    x1, x2 = x_THR[..., 0::2], x_THR[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
