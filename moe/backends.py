"""Grouped expert FFNs for the ``torch`` backend: ``x_RD`` sorted by expert + ``counts_L`` -> ``y_RD``.

Two strategies, picked per device by :func:`grouped_ffn_for` (once per call site, not inside the math):

- :func:`cpu_ffn` (CPU), the one driver of every CPU expert FFN, over a :class:`CpuGemms` provider (fp32
  weights: :class:`TensorGemms`, which :func:`loop_ffn` wraps; FP8 weights: ``quant.Fp8Experts``). Few rows per
  expert (decode): the grouped skinny GEMM of ``moe/kernels/cpu_gemm.py``, which streams each expert weight
  once; prefill-sized blocks (``BLOCK_GEMM_MIN_ROWS`` on average): the grouped block GEMM (packed,
  register-tiled; 1.1-1.5x MKL per expert); both run the activation in place in a scratch buffer. Without the C
  kernels (or under autograd), one pass over the experts: BLAS on the *transposed* block,
  ``h_XM = w13 @ x_MD.T``, MKL's fastest form for ``[out, in]`` weights at tens to hundreds of rows (measured
  1.2-2x ``F.linear``); from a few hundred rows, BLAS in row layout written straight into ``y``.
  It reads counts on the host, which on the CPU costs nothing.
- ``grouped_mm_ffn`` (CUDA): ``torch._grouped_mm`` with device offsets; no host synchronisation.

Shape legend: R routed rows (sorted by expert), D hidden, F expert FFN size, L experts, M rows of one expert.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from moe.activations import ActivationSpec
from moe.kernels.cpu_gemm import (
    block_gemm_available,
    block_gemm_grouped,
    decode_moe,
    skinny_gemm,
    skinny_gemm_available,
    skinny_gemm_grouped,
)
from moe.workspace import scratch

# Up to this many rows per expert the CPU skinny GEMM beats BLAS (measured crossover on AVX2, 2 threads).
SKINNY_MAX_ROWS = 32
# From this many rows BLAS in row layout (x @ w.T, written straight into y) beats the transposed block, which
# wins between the two (MKL, AVX2, 2 threads: 90 vs 50 GFLOP/s at M=128; in the layer, 530 vs 612 ms of GEMM
# at T=2048, M~512).
ROW_LAYOUT_MIN_ROWS = 384
# From this many mean rows per expert (over experts with rows) the grouped block GEMM (csrc/block_gemm.c) takes
# every block: on the layer benchmark's GEMM shapes (Zen 4, 2 threads) it beat the per-expert BLAS calls by
# 1.2-2x from 24 to 1024 rows (AVX-512 kernel; the AVX2 one 1.05-1.8x), and below 24 rows the skinny kernel or
# the per-expert path wins.
BLOCK_GEMM_MIN_ROWS = 24


Proj = Literal["w13", "w2"]
GroupedKernel = Literal["skinny", "block"]


class CpuGemms(Protocol):
    """One set of routed experts as :func:`cpu_ffn` multiplies them on the CPU. ``Experts`` supplies
    :class:`TensorGemms` (weights in the compute dtype), ``quant.Fp8Experts`` its e4m3 weights with their scales.

    ``proj`` names a projection: ``"w13"`` (``[L, X, D]``) or ``"w2"`` (``[L, D, F]``).
    """

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: rows, outputs and biases."""
        ...

    @property
    def rows13(self) -> int:
        """X, the first projection's output rows."""
        ...

    @property
    def hidden(self) -> int:
        """D."""
        ...

    @property
    def b13_LX(self) -> torch.Tensor | None: ...

    @property
    def b2_LD(self) -> torch.Tensor | None: ...

    def kernels_apply(self, x_RD: torch.Tensor) -> bool:
        """Whether the C kernels can run these weights on ``x_RD`` (device, dtype, library present; the driver
        checks autograd itself)."""
        ...

    def requires_grad(self) -> bool: ...

    def grouped(self, kernel: GroupedKernel, proj: Proj, x_RD: torch.Tensor, counts_L: torch.Tensor,
                out_RO: torch.Tensor | None = None) -> torch.Tensor:
        """One C call over every expert: ``kernel`` ``"skinny"`` (few rows each) or ``"block"`` (prefill)."""
        ...

    def skinny(self, proj: Proj, e: int, x_MD: torch.Tensor, out_MO: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s few rows through the skinny C kernel, into ``out_MO``."""
        ...

    def dense(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s ``(w13_XD, w2_DF)`` in ``dtype``, for BLAS (differentiable where the weights are)."""
        ...


def cpu_ffn(x_RD: torch.Tensor, counts_L: torch.Tensor, gemms: CpuGemms, act: ActivationSpec) -> torch.Tensor:
    """``y_RD``: each expert's rows (sorted by expert, ``counts_L[e]`` each) through its FFN, on the CPU.

    1. Decode-sized (at most ``SKINNY_MAX_ROWS`` rows per expert) or prefill-sized (``BLOCK_GEMM_MIN_ROWS`` mean
       rows) blocks: one grouped C call per projection over all experts (:func:`grouped_ffn`).
    2. Otherwise, per expert: few rows through the skinny kernel, else BLAS on the dense weights (transposed
       block below ``ROW_LAYOUT_MIN_ROWS`` rows, row layout above).
    The C kernels have no backward: under autograd every block takes the BLAS path.
    """
    x_RD = x_RD.to(gemms.dtype).contiguous()
    wants_grad = torch.is_grad_enabled() and (x_RD.requires_grad or gemms.requires_grad())
    fast = not wants_grad and gemms.kernels_apply(x_RD)
    kernel = cpu_grouped_kernel(x_RD, counts_L) if fast else None
    if kernel is not None:
        return grouped_ffn(functools.partial(gemms.grouped, kernel), x_RD, counts_L, gemms.rows13, act,
                           gemms.b13_LX, gemms.b2_LD)
    y_RD = torch.empty(x_RD.shape[0], gemms.hidden, dtype=gemms.dtype, device=x_RD.device)
    for e, start, end in expert_blocks(counts_L):
        x_MD, out_MD = x_RD[start:end], y_RD[start:end]
        b13 = None if gemms.b13_LX is None else gemms.b13_LX[e]
        b2 = None if gemms.b2_LD is None else gemms.b2_LD[e]
        if fast and end - start <= SKINNY_MAX_ROWS:
            h_MX = gemms.skinny("w13", e, x_MD, torch.empty(end - start, gemms.rows13, dtype=gemms.dtype))
            rows_ffn(h_MX, lambda a, out, e=e: gemms.skinny("w2", e, a, out), act, b13, b2, out_MD)
            continue
        w13_XD, w2_DF = gemms.dense(e)
        if end - start < ROW_LAYOUT_MIN_ROWS:
            transposed_ffn(x_MD, w13_XD, w2_DF, act, b13, b2, out_MD)
        else:
            rows_ffn(torch.mm(x_MD, w13_XD.t()), lambda a, out, w=w2_DF: _mm_into(a, w.t(), out), act, b13, b2,
                     out_MD)
    return y_RD


@dataclass
class TensorGemms:
    """:class:`CpuGemms` of weight tensors in the compute dtype (``Experts``; the functional :func:`loop_ffn`)."""

    w13_LXD: torch.Tensor
    w2_LDF: torch.Tensor
    b13_LX: torch.Tensor | None = None
    b2_LD: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.w13_LXD.dtype

    @property
    def rows13(self) -> int:
        return self.w13_LXD.shape[1]

    @property
    def hidden(self) -> int:
        return self.w2_LDF.shape[1]

    def kernels_apply(self, x_RD: torch.Tensor) -> bool:
        return self.dtype == torch.float32 and x_RD.device.type == "cpu" and skinny_gemm_available()

    def requires_grad(self) -> bool:
        return self.w13_LXD.requires_grad or self.w2_LDF.requires_grad

    def _weight(self, proj: Proj) -> torch.Tensor:
        return self.w13_LXD if proj == "w13" else self.w2_LDF

    def grouped(self, kernel: GroupedKernel, proj: Proj, x_RD: torch.Tensor, counts_L: torch.Tensor,
                out_RO: torch.Tensor | None = None) -> torch.Tensor:
        gemm = skinny_gemm_grouped if kernel == "skinny" else block_gemm_grouped
        return gemm(x_RD, self._weight(proj), counts_L, out_RO)

    def skinny(self, proj: Proj, e: int, x_MD: torch.Tensor, out_MO: torch.Tensor) -> torch.Tensor:
        return skinny_gemm(x_MD, self._weight(proj)[e], out_MO)

    def dense(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13_LXD[e], self.w2_LDF[e]


def loop_ffn(x_RD: torch.Tensor, counts_L: torch.Tensor, w13_LXD: torch.Tensor, w2_LDF: torch.Tensor,
             act: ActivationSpec, b13_LX: torch.Tensor | None = None, b2_LD: torch.Tensor | None = None
             ) -> torch.Tensor:
    """:func:`cpu_ffn` over weight tensors (the CPU strategy of :func:`grouped_ffn_for`)."""
    return cpu_ffn(x_RD, counts_L, TensorGemms(w13_LXD, w2_LDF, b13_LX, b2_LD), act)


def cpu_grouped_kernel(x_RD: torch.Tensor, counts_L: torch.Tensor) -> GroupedKernel | None:
    """Which grouped C kernel takes a CPU block of rows sorted by expert: ``"skinny"`` when every expert has at
    most ``SKINNY_MAX_ROWS`` rows, ``"block"`` from ``BLOCK_GEMM_MIN_ROWS`` rows per expert on average (over
    experts with rows), else None (per-expert calls). The caller checks dtype, device and autograd."""
    if not x_RD.shape[0]:
        return None
    if int(counts_L.max()) <= SKINNY_MAX_ROWS:  # NOTE: host sync (CPU only: free)
        return "skinny"
    active = int((counts_L > 0).sum())  # NOTE: host sync (CPU only, as above)
    return "block" if block_gemm_available() and x_RD.shape[0] / active >= BLOCK_GEMM_MIN_ROWS else None


def cpu_decode_moe(x_TD: torch.Tensor, routing, experts) -> torch.Tensor | None:
    """The whole routed pass (shuffle, grouped FFN, weighted combine) as :func:`moe.kernels.cpu_gemm.decode_moe`
    when it applies: CPU, fp32 plain experts without biases, weights on the output, the C library present, and at
    most ``SKINNY_MAX_ROWS`` rows per expert (decode). Else None: the caller runs the step by step path, which
    gives bit-identical results (same GEMM kernel, order and rounding)."""
    w13, w2 = experts.w13_E2FD, experts.w2_EDF
    if x_TD.shape[0] * routing.ids_TK.shape[1] > w13.shape[0] * SKINNY_MAX_ROWS:
        return None  # some expert must get more than SKINNY_MAX_ROWS rows: skip the C call's counting sort
    if (x_TD.device.type != "cpu" or w13.dtype != torch.float32 or experts.b13_E2F is not None
            or experts.b2_ED is not None or routing.apply_on_input or not skinny_gemm_available()):
        return None
    return decode_moe(x_TD.float().contiguous(), routing.ids_TK.to(torch.int32).contiguous(),
                      routing.weights_TK.float().contiguous(), w13.contiguous(), w2.contiguous(),
                      ActivationSpec.of(experts.config), SKINNY_MAX_ROWS)


def grouped_ffn(grouped_gemm, x_RD, counts_L, rows13: int, act: ActivationSpec, b13_LX, b2_LD) -> torch.Tensor:
    """Both GEMMs as one ``grouped_gemm(proj, x, counts, out=None)`` call each over all experts (the skinny
    kernel for decode, the block kernel for prefill) and the in-place activation once over all rows (it is
    row-wise), instead of a few ops per expert. ``h_RX`` lives in this thread's scratch buffer
    (``moe.workspace``): at prefill sizes a fresh one costs more in page faults than the activation itself."""
    h_RX = grouped_gemm("w13", x_RD, counts_L, scratch("moe.h13", (x_RD.shape[0], rows13)))
    if b13_LX is not None:
        bias_RX = b13_LX.repeat_interleave(counts_L, dim=0)
        h_RX[: bias_RX.shape[0]] += bias_RX
    y_RD = grouped_gemm("w2", act.in_place(h_RX), counts_L)
    if b2_LD is not None:
        bias_RD = b2_LD.repeat_interleave(counts_L, dim=0)
        y_RD[: bias_RD.shape[0]] += bias_RD
    return y_RD


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        out.copy_(torch.mm(a, b))  # mm(out=) is not differentiable
    else:
        torch.mm(a, b, out=out)


def expert_blocks(counts_L: torch.Tensor) -> Iterator[tuple[int, int, int]]:
    """``(expert, first row, end row)`` of every expert that has rows."""
    start = 0
    for e, rows in enumerate(counts_L.tolist()):  # NOTE: host sync (CPU strategy only, where it is free)
        if rows:
            yield e, start, start + rows
        start += rows


def rows_ffn(h_MX, matmul2_into, act, b13_X, b2_D, out_MD) -> None:
    """The rest of one expert in row layout, from its first GEMM's ``h_MX``: bias, activation,
    ``matmul2_into(a_MF, out_MD)``, bias."""
    if b13_X is not None:
        h_MX += b13_X
    matmul2_into(act(h_MX).contiguous(), out_MD)
    if b2_D is not None:
        out_MD += b2_D


def transposed_ffn(x_MD, w13_XD, w2_DF, act, b13_X, b2_D, out_MD) -> None:
    """One expert through BLAS on the transposed block (``h_XM = w13 @ x.T``), written into ``out_MD``."""
    h_XM = torch.mm(w13_XD, x_MD.t())
    if b13_X is not None:
        h_XM += b13_X.unsqueeze(1)
    y_DM = torch.mm(w2_DF, act(h_XM, dim=0))
    if b2_D is not None:
        y_DM += b2_D.unsqueeze(1)
    out_MD.copy_(y_DM.t())


def grouped_mm_ffn(x_RD: torch.Tensor, counts_L: torch.Tensor, w13_LXD: torch.Tensor, w2_LDF: torch.Tensor,
                   act: ActivationSpec, b13_LX: torch.Tensor | None = None, b2_LD: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The CUDA strategy: ``torch._grouped_mm`` over device offsets, no host synchronisation."""
    ends_L = torch.cumsum(counts_L, 0, dtype=torch.int32)
    x_RD = x_RD.to(w13_LXD.dtype)
    h_RX = torch._grouped_mm(x_RD, w13_LXD.transpose(1, 2), offs=ends_L)
    expert_of_R = None
    if b13_LX is not None or b2_LD is not None:
        expert_of_R = _expert_of_rows(counts_L, x_RD.shape[0])
    if b13_LX is not None:
        h_RX = h_RX + b13_LX[expert_of_R]
    a_RF = act(h_RX)
    y_RD = torch._grouped_mm(a_RF, w2_LDF.transpose(1, 2), offs=ends_L)
    if b2_LD is not None:
        y_RD = y_RD + b2_LD[expert_of_R]
    return y_RD


def _expert_of_rows(counts_L: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The expert of each sorted row, from counts alone, without a host sync."""
    ends_L = torch.cumsum(counts_L, 0)
    rows_R = torch.arange(num_rows, device=counts_L.device)
    return torch.searchsorted(ends_L, rows_R, right=True).clamp_(max=counts_L.numel() - 1)


GroupedFFN = Callable[..., torch.Tensor]


def grouped_ffn_for(device: torch.device) -> GroupedFFN:
    """The torch-backend strategy for a device: ``grouped_mm_ffn`` on CUDA, ``loop_ffn`` elsewhere."""
    return grouped_mm_ffn if torch.device(device).type == "cuda" else loop_ffn
