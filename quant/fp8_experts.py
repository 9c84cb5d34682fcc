"""``Fp8Experts``: routed experts with e4m3fn weights, a drop-in for ``moe.experts.Experts``.

Shape legend: E experts, D hidden, F expert FFN size, X = 2F (gated) or F, R routed rows sorted by expert.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from moe.activations import expert_activation
from moe.backends import SKINNY_MAX_ROWS, expert_blocks, rows_ffn, transposed_ffn
from moe.config import MoEConfig
from moe.cpu_gemm import dequantize_fp8, skinny_gemm_available, skinny_gemm_fp8
from quant.fp8 import BLOCK, Scheme, dequantize_weight, quantize_weight


class Fp8Experts(nn.Module):
    """``Fp8Experts(config, scheme, w13_E2FD, w2_EDF, b13_E2F=None, b2_ED=None)(x_RD, counts_E) -> y_RD``.

    Buffers: ``w13_E2FD`` / ``w2_EDF`` (e4m3fn) with ``w13_scale`` / ``w2_scale`` (fp32; ``[E, X]`` for
    ``channel``, ``[E, ceil(X/128), ceil(D/128)]`` for ``block``). Biases stay in high precision.
    CPU: few rows per expert go through the skinny GEMM, dequantising in registers (a quarter of the fp32
    weight bytes); more rows dequantise that expert's weights once and use BLAS.
    """

    def __init__(self, config: MoEConfig, scheme: Scheme | str, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor,
                 b13_E2F: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.scheme = Scheme(scheme)
        self.block = BLOCK if self.scheme is Scheme.BLOCK else None
        q13, s13 = quantize_weight(w13_E2FD, self.scheme)
        q2, s2 = quantize_weight(w2_EDF, self.scheme)
        self.register_buffer("w13_E2FD", q13)
        self.register_buffer("w13_scale", s13)
        self.register_buffer("w2_EDF", q2)
        self.register_buffer("w2_scale", s2)
        self.b13_E2F = None if b13_E2F is None else nn.Parameter(b13_E2F.detach().clone(), requires_grad=False)
        self.b2_ED = None if b2_ED is None else nn.Parameter(b2_ED.detach().clone(), requires_grad=False)
        # Reused fp32 home for one dequantised expert: fresh pages for ~35 MB per expert per call cost more
        # than the dequantisation itself (first-touch page faults). Not part of the state dict.
        self._scratch: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w13_E2FD.shape[0]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(w13_E2FD, w2_EDF)``: the weights the FP8 experts actually compute with."""
        return (dequantize_weight(self.w13_E2FD, self.w13_scale, self.block),
                dequantize_weight(self.w2_EDF, self.w2_scale, self.block))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        act = functools.partial(expert_activation, activation=cfg.activation, alpha=cfg.swiglu_alpha,
                                limit=cfg.swiglu_limit)
        x_RD = x_RD.float().contiguous()
        y_RD = torch.empty(x_RD.shape[0], self.w2_EDF.shape[1], dtype=torch.float32, device=x_RD.device)
        skinny = x_RD.device.type == "cpu" and skinny_gemm_available()
        blk = self.block or 0
        for e, start, end in expert_blocks(counts_E):
            b13 = None if self.b13_E2F is None else self.b13_E2F[e].float()
            b2 = None if self.b2_ED is None else self.b2_ED[e].float()
            if skinny and end - start <= SKINNY_MAX_ROWS:
                q13, s13, q2, s2 = self.w13_E2FD[e], self.w13_scale[e], self.w2_EDF[e], self.w2_scale[e]
                rows_ffn(x_RD[start:end], lambda x: skinny_gemm_fp8(x, q13, s13, blk),
                         lambda a, out: skinny_gemm_fp8(a, q2, s2, blk, out), act, b13, b2, y_RD[start:end])
            else:
                w13, w2 = self._dequantized_expert(e, skinny)
                transposed_ffn(x_RD[start:end], w13, w2, act, b13, b2, y_RD[start:end])
        return y_RD

    def _dequantized_expert(self, e: int, fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if fast:  # one vectorised pass in C into the reused scratch; torch's fp8 -> fp32 cast is far slower
            (X, D), (_, F) = self.w13_E2FD.shape[1:], self.w2_EDF.shape[1:]
            if self._scratch is None or self._scratch.numel() != X * D + D * F:
                self._scratch = torch.empty(X * D + D * F)
            blk = self.block or 0
            return (dequantize_fp8(self.w13_E2FD[e], self.w13_scale[e], blk, self._scratch[: X * D].view(X, D)),
                    dequantize_fp8(self.w2_EDF[e], self.w2_scale[e], blk, self._scratch[X * D:].view(D, F)))
        return (dequantize_weight(self.w13_E2FD[e], self.w13_scale[e], self.block),
                dequantize_weight(self.w2_EDF[e], self.w2_scale[e], self.block))

    def weight_bytes(self) -> int:
        """Bytes of expert weights as stored: FP8 values, their scales and the biases."""
        tensors = [self.w13_E2FD, self.w13_scale, self.w2_EDF, self.w2_scale, self.b13_E2F, self.b2_ED]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
