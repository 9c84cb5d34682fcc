"""Checkpoint tensors stored in another layout than ours, and the conversions both ways.

gpt-oss keeps its experts as ``transformers`` computes them, ``[E, in, out]`` with gate and up *interleaved*
(column ``2j`` gate, ``2j + 1`` up), where ``moe.MoE`` keeps ``[E, out, in]`` with the gate rows then the up rows.
Its released checkpoints store the expert weights in MXFP4 (OCP microscaling FP4): ``<name>_blocks``
``[E, out, in / 32, 16]`` uint8, two e2m1 values a byte (low nibble first), and ``<name>_scales`` ``[E, out, in / 32]``
uint8 exponents (``2 ** (scale - 127)``) per 32 values. They are dequantised at load, to the serving dtype, or to
FP8 when FP8 experts are asked for (``quantization=``); no MXFP4 kernel runs yet.

``LAYOUTS[name] = (to_ours, to_disk)``; ``to_disk`` is None where we do not write the format (MXFP4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
# the e2m1 code points: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6 (OCP MX spec, transformers' FP4_VALUES)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def deinterleave(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Entries ``0, 2, 4, ..`` then ``1, 3, 5, ..`` of ``dim``: interleaved gate/up -> gate half, up half."""
    n = x.shape[dim]
    return torch.cat([x.narrow(dim, 0, n).unflatten(dim, (n // 2, 2)).select(dim + 1, i) for i in (0, 1)], dim)


def interleave(x: torch.Tensor, dim: int) -> torch.Tensor:
    gate, up = x.chunk(2, dim)
    return torch.stack([gate, up], dim + 1).flatten(dim, dim + 1)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``blocks [..., G, 16]`` uint8 and ``scales [..., G]`` uint8 -> fp32 ``[..., G * 32]``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype}: expected uint8 [..., G, 16] and uint8 [..., G]")
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None].float())
    return values.flatten(-2)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse for tests and tools: fp32 ``[..., K]`` (K % 32 == 0) -> (blocks, scales), each group of 32 scaled
    by the power of two that brings its largest magnitude to at most 6, values rounded to the nearest e2m1."""
    groups = w.float().unflatten(-1, (-1, 32))
    amax = groups.abs().amax(-1).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=w.device)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # nearest code (ties: the lower code)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def _gate_up_in_out(t: torch.Tensor) -> torch.Tensor:  # [E, D, 2F] interleaved -> [E, 2F, D] halves
    return deinterleave(t, 2).transpose(1, 2).contiguous()


def _gate_up_out_in(t: torch.Tensor) -> torch.Tensor:  # the inverse
    return interleave(t.transpose(1, 2), 2).contiguous()


Convert = Callable[..., torch.Tensor]
LAYOUTS: dict[str, tuple[Convert, Convert | None]] = {
    "in_out": (lambda t: t.transpose(1, 2).contiguous(), lambda t: t.transpose(1, 2).contiguous()),
    "gate_up_in_out": (_gate_up_in_out, _gate_up_out_in),
    "gate_up_bias": (lambda t: deinterleave(t, 1).contiguous(), lambda t: interleave(t, 1).contiguous()),
    "mxfp4": (dequantize_mxfp4, None),  # [E, out, in] as stored
    "mxfp4_gate_up": (lambda blocks, scales: deinterleave(dequantize_mxfp4(blocks, scales), 1), None),
}
