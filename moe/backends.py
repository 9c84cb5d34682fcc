"""Grouped expert FFNs for the ``torch`` backend: ``x_RD`` sorted by expert + ``counts_L`` -> ``y_RD``.

Two strategies, picked per device by :func:`grouped_ffn_for` (once per call site, not inside the math):

- ``loop_ffn`` (CPU): few rows per expert (decode): the grouped skinny GEMM of ``moe/kernels/cpu_gemm.py``, which
  streams each expert weight once; prefill-sized blocks (``BLOCK_GEMM_MIN_ROWS`` on average): the grouped block
  GEMM (packed, register-tiled; 1.1-1.5x MKL per expert); both run the activation in place in a scratch buffer.
  Without the C kernels (or under autograd), one pass over the experts: BLAS on the *transposed* block,
  ``h_XM = w13 @ x_MD.T``, MKL's fastest form for ``[out, in]`` weights at tens to hundreds of rows (measured
  1.2-2x ``F.linear``); from a few hundred rows, BLAS in row layout written straight into ``y``.
  It reads counts on the host, which on the CPU costs nothing.
- ``grouped_mm_ffn`` (CUDA): ``torch._grouped_mm`` with device offsets; no host synchronisation.

Shape legend: R routed rows (sorted by expert), D hidden, F expert FFN size, L experts, M rows of one expert.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch

from moe.activations import expert_activation, expert_activation_
from moe.config import Activation
from moe.kernels.cpu_gemm import (block_gemm_available, block_gemm_grouped, decode_moe, skinny_gemm, skinny_gemm_available,
                          skinny_gemm_grouped)
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


def loop_ffn(
    x_RD: torch.Tensor,
    counts_L: torch.Tensor,
    w13_LXD: torch.Tensor,
    w2_LDF: torch.Tensor,
    activation: Activation,
    b13_LX: torch.Tensor | None = None,
    b2_LD: torch.Tensor | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    x_RD = x_RD.to(w13_LXD.dtype).contiguous()
    # The skinny GEMM is a C kernel with no backward: under autograd every block takes the BLAS path.
    wants_grad = torch.is_grad_enabled() and (x_RD.requires_grad or w13_LXD.requires_grad)
    skinny = (w13_LXD.dtype == torch.float32 and x_RD.device.type == "cpu" and not wants_grad
              and skinny_gemm_available())
    kernel = cpu_grouped_kernel(x_RD, counts_L) if skinny else None
    if kernel is not None:
        act_ = functools.partial(expert_activation_, activation=activation, alpha=alpha, limit=limit)
        grouped_gemm = skinny_gemm_grouped if kernel == "skinny" else block_gemm_grouped
        return grouped_ffn(grouped_gemm, x_RD, counts_L, w13_LXD, w2_LDF, act_, b13_LX, b2_LD)
    act = functools.partial(expert_activation, activation=activation, alpha=alpha, limit=limit)
    y_RD = torch.empty(x_RD.shape[0], w2_LDF.shape[1], dtype=w2_LDF.dtype, device=x_RD.device)
    for e, start, end in expert_blocks(counts_L):
        b13, b2 = (None if b13_LX is None else b13_LX[e]), (None if b2_LD is None else b2_LD[e])
        if skinny and end - start <= SKINNY_MAX_ROWS:
            w13, w2 = w13_LXD[e], w2_LDF[e]
            rows_ffn(x_RD[start:end], lambda x, w=w13: skinny_gemm(x, w), lambda a, out, w=w2: skinny_gemm(a, w, out),
                     act, b13, b2, y_RD[start:end])
        elif end - start < ROW_LAYOUT_MIN_ROWS:
            transposed_ffn(x_RD[start:end], w13_LXD[e], w2_LDF[e], act, b13, b2, y_RD[start:end])
        else:
            w13, w2 = w13_LXD[e], w2_LDF[e]
            rows_ffn(x_RD[start:end], lambda x, w=w13: torch.mm(x, w.t()),
                     lambda a, out, w=w2: _mm_into(a, w.t(), out), act, b13, b2, y_RD[start:end])
    return y_RD


def cpu_grouped_kernel(x_RD: torch.Tensor, counts_L: torch.Tensor) -> str | None:
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
    """The whole routed pass (shuffle, grouped FFN, weighted combine) as :func:`moe.kernels.cpu_gemm.decode_moe` when
    it applies: CPU, fp32 plain experts without biases, weights on the output, the C library present, and at
    most ``SKINNY_MAX_ROWS`` rows per expert (decode). Else None: the caller runs the step by step path, which
    gives bit-identical results (same GEMM kernel, order and rounding)."""
    w13, w2 = experts.w13_E2FD, experts.w2_EDF
    if x_TD.shape[0] * routing.ids_TK.shape[1] > w13.shape[0] * SKINNY_MAX_ROWS:
        return None  # some expert must get more than SKINNY_MAX_ROWS rows: skip the C call's counting sort
    if (x_TD.device.type != "cpu" or w13.dtype != torch.float32 or experts.b13_E2F is not None
            or experts.b2_ED is not None or routing.apply_on_input or not skinny_gemm_available()):
        return None
    cfg = experts.config
    act = functools.partial(expert_activation, activation=cfg.activation, alpha=cfg.swiglu_alpha,
                            limit=cfg.swiglu_limit)
    return decode_moe(x_TD.float().contiguous(), routing.ids_TK.to(torch.int32).contiguous(),
                      routing.weights_TK.float().contiguous(),
                      w13.contiguous(), w2.contiguous(), act, SKINNY_MAX_ROWS)


def grouped_ffn(grouped_gemm, x_RD, counts_L, w13_LXD, w2_LDF, act_, b13_LX, b2_LD) -> torch.Tensor:
    """Both GEMMs as one ``grouped_gemm`` call each over all experts (the skinny kernel for decode, the block
    kernel for prefill) and the in-place activation ``act_`` once over all rows (it is row-wise), instead of a
    few ops per expert. ``h_RX`` lives in this thread's scratch buffer (``moe.workspace``): at prefill sizes a
    fresh one costs more in page faults than the activation itself."""
    h_RX = grouped_gemm(x_RD, w13_LXD, counts_L, scratch("moe.h13", (x_RD.shape[0], w13_LXD.shape[1])))
    if b13_LX is not None:
        bias_RX = b13_LX.repeat_interleave(counts_L, dim=0)
        h_RX[: bias_RX.shape[0]] += bias_RX
    y_RD = grouped_gemm(act_(h_RX), w2_LDF, counts_L)
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


def rows_ffn(x_MD, matmul13, matmul2_into, act, b13_X, b2_D, out_MD) -> None:
    """One expert on a few rows, row layout: ``matmul13(x) -> h_MX``, ``matmul2_into(a_MF, out_MD)``."""
    h_MX = matmul13(x_MD)
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


def grouped_mm_ffn(
    x_RD: torch.Tensor,
    counts_L: torch.Tensor,
    w13_LXD: torch.Tensor,
    w2_LDF: torch.Tensor,
    activation: Activation,
    b13_LX: torch.Tensor | None = None,
    b2_LD: torch.Tensor | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    ends_L = torch.cumsum(counts_L, 0, dtype=torch.int32)
    x_RD = x_RD.to(w13_LXD.dtype)
    h_RX = torch._grouped_mm(x_RD, w13_LXD.transpose(1, 2), offs=ends_L)
    expert_of_R = None
    if b13_LX is not None or b2_LD is not None:
        expert_of_R = _expert_of_rows(counts_L, x_RD.shape[0])
    if b13_LX is not None:
        h_RX = h_RX + b13_LX[expert_of_R]
    a_RF = expert_activation(h_RX, activation, alpha=alpha, limit=limit)
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
