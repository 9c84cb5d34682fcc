"""``Fp8Experts``: routed experts with e4m3fn weights, a drop-in for ``moe.experts.Experts``.

Shape legend: E experts, D hidden, F expert FFN size, X = 2F (gated) or F, R routed rows sorted by expert,
H halves of ``w13`` (2 when gated: gate rows, then up rows; else 1).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from moe.activations import ActivationSpec
from moe.backends import cpu_ffn
from moe.config import MoEConfig
from moe.experts import Experts
from moe.kernels.cpu_gemm import (
    block_gemm_grouped_fp8,
    dequantize_fp8,
    skinny_gemm_available,
    skinny_gemm_fp8,
    skinny_gemm_grouped_fp8,
)
from quant.fp8 import BLOCK, Scheme, dequantize_weight, quantize_weight

# moe.backends.cpu_grouped_kernel's choice -> the grouped FP8 kernel that runs it
GROUPED_FP8_GEMMS = {"skinny": skinny_gemm_grouped_fp8, "block": block_gemm_grouped_fp8}


class Fp8Experts(nn.Module):
    """``Fp8Experts(config, num_local_experts=None, weights=None)(x_RD, counts_E) -> y_RD``.

    ``config.quant`` picks the scheme. ``weights``: an ``Experts`` whose weights are quantised (default: fresh
    ones, initialised as ``Experts`` initialises them). Buffers: ``w13_E2FD`` / ``w2_EDF`` (e4m3fn) with
    ``w13_scale`` / ``w2_scale`` (fp32). ``fp8-channel``: ``[E, X]`` / ``[E, D]``, one scale per output row.
    ``fp8-block``: DeepSeek-V3 ``weight_scale_inv`` blocks of 128x128, ``w2_scale [E, ceil(D/128),
    ceil(F/128)]``; ``w13``'s gate and up halves each have blocks of their own, ``w13_scale [E, H *
    ceil(X/H/128), ceil(D/128)]``, so per-expert checkpoints (gate_proj, up_proj) load bit-exactly whatever F is.
    Biases stay in high precision. ``.to(dtype)`` moves these tensors between devices but keeps their dtypes.

    The forward is ``moe.backends.cpu_ffn`` (the driver fp32 experts use too) over :class:`Fp8Gemms`: few rows
    per expert go through the grouped skinny GEMM, dequantising in registers (a quarter of the fp32 weight
    bytes); prefill-sized blocks through the grouped block GEMM, which converts each weight as it packs it
    (``moe.kernels.cpu_gemm.block_gemm_grouped_fp8``); in between, per expert: the skinny GEMM for few rows,
    else that expert's weights dequantised once and BLAS (always the latter under autograd). GPU: the Triton FP8
    grouped GEMM (``moe.kernels.fp8_grouped_gemm``) when the layer's backend is ``triton``.
    """

    SCALES = {"w13_E2FD": "w13_scale", "w2_EDF": "w2_scale"}  # weight buffer -> its scale buffer
    w13_E2FD: torch.Tensor  # buffers (registered in __init__)
    w2_EDF: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    b13_E2F: nn.Parameter | None
    b2_ED: nn.Parameter | None

    def __init__(self, config: MoEConfig, num_local_experts: int | None = None, weights: Experts | None = None) -> None:
        super().__init__()
        if config.quant is None:
            raise ValueError("Fp8Experts needs config.quant ('fp8-channel' or 'fp8-block'), got None")
        self.config = config
        self.scheme = Scheme(config.quant.scheme)
        self.block = BLOCK if self.scheme is Scheme.BLOCK else None
        if weights is None:
            weights = Experts(dataclasses.replace(config, quant=None), num_local_experts)
        for name in self.SCALES:
            q, scale = self._quantize(name, getattr(weights, name))
            self.register_buffer(name, q)
            self.register_buffer(self.SCALES[name], scale)
        b13, b2 = weights.b13_E2F, weights.b2_ED
        self.b13_E2F = None if b13 is None else nn.Parameter(b13.detach().clone(), requires_grad=False)
        self.b2_ED = None if b2 is None else nn.Parameter(b2.detach().clone(), requires_grad=False)
        # Reused fp32 home for one dequantised expert: fresh pages for ~35 MB per expert per call cost more
        # than the dequantisation itself (first-touch page faults). Not part of the state dict.
        self._scratch: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w13_E2FD.shape[0]

    # -- layout: rows of a weight come in H halves, each quantised as a matrix of its own ----------------------
    def _half_rows(self, name: str) -> int:
        halves = 2 if name == "w13_E2FD" and self.config.activation.gated else 1
        rows = self.config.w13_rows if name == "w13_E2FD" else self.config.hidden_size
        return rows // halves

    def _quantize(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w [..., k * half, in]`` (whole halves of ``name``'s rows) -> ``(q, scale)`` in this layout."""
        half = self._half_rows(name)
        if w.shape[-2] % half:
            raise ValueError(f"{name}: {w.shape[-2]} rows are not whole halves of {half} rows")
        q, scale = quantize_weight(w.unflatten(-2, (w.shape[-2] // half, half)), self.scheme)
        return q.flatten(-3, -2), (scale.flatten(-3, -2) if self.block else scale.flatten(-2, -1))

    def _dequantize(self, name: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        k = q.shape[-2] // self._half_rows(name)
        scale = scale.unflatten(-2 if self.block else -1, (k, -1))
        return dequantize_weight(q.unflatten(-2, (k, -1)), scale, self.block).flatten(-3, -2)

    def _halves(self, name: str, e: int) -> list[tuple[torch.Tensor, torch.Tensor, slice]]:
        """Expert ``e``'s ``(q, scale, rows)`` per half of ``name`` (contiguous views)."""
        q, scale = getattr(self, name)[e], getattr(self, self.SCALES[name])[e]
        half = self._half_rows(name)
        step = scale.shape[0] * half // q.shape[0]  # scale rows per half
        return [(q[h * half:(h + 1) * half], scale[h * step:(h + 1) * step], slice(h * half, (h + 1) * half))
                for h in range(q.shape[0] // half)]

    def scale_index(self, name: str, index: tuple) -> tuple:
        """The index of ``name``'s scale buffer that holds the scales of ``getattr(self, name)[index]``.

        ``index`` is ``()``, ``(e,)`` or ``(e, rows)`` with ``rows`` a slice over whole halves.
        """
        if len(index) < 2:
            return index
        *lead, rows = index
        half = self._half_rows(name)
        start, stop, _ = rows.indices(getattr(self, name).shape[1])
        if start % half or stop % half:
            raise ValueError(f"rows {start}:{stop} of {name} must cover whole halves of {half} rows")
        step = getattr(self, self.SCALES[name]).shape[1] * half // getattr(self, name).shape[1]
        return (*lead, slice(start // half * step, stop // half * step))

    # -- filling from checkpoints (serve.models.loader) ---------------------------------------------------------------
    @torch.no_grad()
    def load_weight(self, name: str, index: tuple, w: torch.Tensor) -> None:
        """Quantise high-precision ``w`` into ``getattr(self, name)[index]`` and its scales."""
        self._store(name, index, *self._quantize(name, w))

    @torch.no_grad()
    def load_fp8(self, name: str, index: tuple, q: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Copy a checkpoint's e4m3 ``q`` into ``getattr(self, name)[index]``; ``scale_inv`` is its DeepSeek-V3
        128x128 block grid, ``q`` taken as one matrix. Bit-exact when that grid is this layout's (one half at a
        time, as per-expert checkpoints store them, or halves of whole blocks); else dequantised and quantised."""
        rows, cols = q.shape[-2:]
        grid = (*q.shape[:-2], -(-rows // BLOCK), -(-cols // BLOCK))
        if tuple(scale_inv.shape) != grid:
            raise ValueError(f"scale_inv {tuple(scale_inv.shape)} of {name} rows {tuple(q.shape)} must be {grid}")
        half = self._half_rows(name)
        if self.scheme is Scheme.BLOCK and (rows == half or half % BLOCK == 0):
            self._store(name, index, q, scale_inv.float())
            return
        warnings.warn(f"{name}: the checkpoint's 128x128 blocks differ from {self.scheme.value} scales here; "
                      "re-quantising (not bit-exact)", stacklevel=2)
        self.load_weight(name, index, dequantize_weight(q, scale_inv.float(), BLOCK))

    def _store(self, name: str, index: tuple, q: torch.Tensor, scale: torch.Tensor) -> None:
        target, scales = getattr(self, name)[index], getattr(self, self.SCALES[name])[self.scale_index(name, index)]
        if q.shape != target.shape or scale.shape != scales.shape:
            raise ValueError(f"{name}{list(index)}: got q {tuple(q.shape)} and scale {tuple(scale.shape)}, expected "
                             f"{tuple(target.shape)} and {tuple(scales.shape)}")
        target.copy_(q)
        scales.copy_(scale)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype), .half(), .float() cast every floating tensor, e4m3 and scales included: the expert
        # storage follows the device only.
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(keep_dtype, recurse)

    # -- compute --------------------------------------------------------------------------------------------------
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(w13_E2FD, w2_EDF)``: the weights the FP8 experts actually compute with."""
        return (self._dequantize("w13_E2FD", self.w13_E2FD, self.w13_scale),
                self._dequantize("w2_EDF", self.w2_EDF, self.w2_scale))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return cpu_ffn(x_RD, counts_E, Fp8Gemms(self), ActivationSpec.of(self.config))

    def _grouped_gemm(self, fp8_gemm, name: str, x_RD: torch.Tensor, counts_E: torch.Tensor,
                      out_RO: torch.Tensor | None = None) -> torch.Tensor:
        """One GEMM over every expert for weight ``name``: one ``fp8_gemm`` call (a value of
        ``GROUPED_FP8_GEMMS``) per half of its rows, each half with its own scales."""
        q_LOD = getattr(self, name)
        if out_RO is None:
            out_RO = torch.empty(x_RD.shape[0], q_LOD.shape[1])
        scale, half = getattr(self, self.SCALES[name]), self._half_rows(name)
        step = scale.shape[1] * half // q_LOD.shape[1]  # scale rows per half
        for h in range(q_LOD.shape[1] // half):
            rows = slice(h * half, (h + 1) * half)
            fp8_gemm(x_RD, q_LOD[:, rows], scale[:, h * step:(h + 1) * step], self.block or 0, counts_E,
                     out_RO[:, rows])
        return out_RO

    def _skinny(self, name: str, e: int, x_MD: torch.Tensor, out_MO: torch.Tensor) -> torch.Tensor:
        for q, scale, rows in self._halves(name, e):
            skinny_gemm_fp8(x_MD, q, scale, self.block or 0, out_MO[:, rows])
        return out_MO

    def _dequantized_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.w13_E2FD.device.type == "cpu" and skinny_gemm_available()):
            return (self._dequantize("w13_E2FD", self.w13_E2FD[e], self.w13_scale[e]),
                    self._dequantize("w2_EDF", self.w2_EDF[e], self.w2_scale[e]))
        # one vectorised pass in C into the reused scratch; torch's fp8 -> fp32 cast is far slower
        (X, D), (_, F) = self.w13_E2FD.shape[1:], self.w2_EDF.shape[1:]
        if self._scratch is None or self._scratch.numel() != X * D + D * F:
            self._scratch = torch.empty(X * D + D * F)
        out = {"w13_E2FD": self._scratch[: X * D].view(X, D), "w2_EDF": self._scratch[X * D:].view(D, F)}
        for name, w in out.items():
            for q, scale, rows in self._halves(name, e):
                dequantize_fp8(q, scale, self.block or 0, w[rows])
        return out["w13_E2FD"], out["w2_EDF"]

    def weight_bytes(self) -> int:
        """Bytes of expert weights as stored: FP8 values, their scales and the biases."""
        tensors = [self.w13_E2FD, self.w13_scale, self.w2_EDF, self.w2_scale, self.b13_E2F, self.b2_ED]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Fp8Gemms:
    """:class:`moe.backends.CpuGemms` of an :class:`Fp8Experts`: fp32 compute, e4m3 weights converted in the C
    kernels' registers (decode) or while they pack (prefill), else one expert at a time dequantised for BLAS."""

    NAMES = {"w13": "w13_E2FD", "w2": "w2_EDF"}

    def __init__(self, experts: Fp8Experts) -> None:
        self.experts = experts
        self.dtype = torch.float32
        self.rows13, self.hidden = experts.w13_E2FD.shape[1], experts.w2_EDF.shape[1]
        self.b13_LX = None if experts.b13_E2F is None else experts.b13_E2F.float()
        self.b2_LD = None if experts.b2_ED is None else experts.b2_ED.float()

    def kernels_apply(self, x_RD: torch.Tensor) -> bool:
        return x_RD.device.type == "cpu" and skinny_gemm_available()

    def requires_grad(self) -> bool:
        return False  # e4m3 buffers; the biases are frozen too

    def grouped(self, kernel: str, proj: str, x_RD: torch.Tensor, counts_L: torch.Tensor,
                out_RO: torch.Tensor | None = None) -> torch.Tensor:
        return self.experts._grouped_gemm(GROUPED_FP8_GEMMS[kernel], self.NAMES[proj], x_RD, counts_L, out_RO)

    def skinny(self, proj: str, e: int, x_MD: torch.Tensor, out_MO: torch.Tensor) -> torch.Tensor:
        return self.experts._skinny(self.NAMES[proj], e, x_MD, out_MO)

    def dense(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.experts._dequantized_expert(e)
