"""FP8 (e4m3fn) weight quantisation: per-output-channel and 128x128-block scales.

``q * scale ~= w``. Block scales use DeepSeek-V3's ``weight_scale_inv`` layout: ``[ceil(O/128), ceil(D/128)]``,
one per weight tile; shapes that are not multiples of the block get a ragged last tile (padding only in
the scale grid), never a refusal. Leading (expert) dimensions are carried through: ``w [E, O, D]`` gives
``scale [E, O]`` (channel) or ``[E, ceil(O/b), ceil(D/b)]`` (block).
"""

from __future__ import annotations

import enum

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
BLOCK = 128


class Scheme(str, enum.Enum):
    CHANNEL = "channel"
    BLOCK = "block"


def quantize_weight(w: torch.Tensor, scheme: Scheme | str, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., O, D]`` (any float dtype) -> ``(q [..., O, D] e4m3fn, scale fp32)``."""
    scheme = Scheme(scheme)
    w32 = w.detach().float()
    if scheme is Scheme.CHANNEL:
        scale = (w32.abs().amax(dim=-1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = (w32 / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q, scale
    tiles, (O, D) = _tiles(w32, block)
    scale = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (tiles / scale.unsqueeze(-2).unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    return _untile(q, O, D).to(FP8), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """fp32 weights from ``q`` and its scales; ``block=None`` means per-channel scales."""
    if block is None:
        return q.float() * scale.unsqueeze(-1)
    tiles, (O, D) = _tiles(q.float(), block)
    return _untile(tiles * scale.unsqueeze(-2).unsqueeze(-1), O, D)


def quantize_activation(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and ``group`` columns (DeepSeek-V3's "dynamic" 1x128 activation scales): ``x [..., D]`` ->
    ``(q [..., D] e4m3fn, scale [..., ceil(D/group)] fp32)``; a ragged last group is zero-padded."""
    D = x.shape[-1]
    groups = torch.nn.functional.pad(x.detach().float(), (0, -D % group)).unflatten(-1, (-1, group))
    q, scale = quantize_weight(groups, Scheme.CHANNEL)
    return q.flatten(-2)[..., :D], scale


def fake_quantize_activation(x: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """``x`` through :func:`quantize_activation` and back, in fp32: the activations an FP8 GEMM multiplies."""
    q, scale = quantize_activation(x, group)
    D = x.shape[-1]
    groups = torch.nn.functional.pad(q.float(), (0, -D % group)).unflatten(-1, (-1, group))
    return (groups * scale.unsqueeze(-1)).flatten(-2)[..., :D]


def _tiles(w: torch.Tensor, block: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[..., O, D]`` -> zero-padded ``[..., O/b, b, D/b, b]`` view of tiles."""
    O, D = w.shape[-2:]
    pad_O, pad_D = -O % block, -D % block
    w = torch.nn.functional.pad(w, (0, pad_D, 0, pad_O))
    return w.view(*w.shape[:-2], (O + pad_O) // block, block, (D + pad_D) // block, block), (O, D)


def _untile(tiles: torch.Tensor, O: int, D: int) -> torch.Tensor:
    lead = tiles.shape[:-4]
    full = tiles.reshape(*lead, tiles.shape[-4] * tiles.shape[-3], tiles.shape[-2] * tiles.shape[-1])
    return full[..., :O, :D].contiguous()
