"""Grouped GEMM 1: gather token rows on load, ``@ w13[e].T``, activation in the epilogue -> ``h_NF``.

Shape legend: T tokens, D hidden, F expert FFN size, X = 2F (gated) or F rows of ``w13``, E experts,
N = T*K routed rows sorted by expert, M rows of one tile.

Sorted row ``r`` reads token ``token_idx_N[r]`` of ``x_TD`` directly (no permuted copy of x). For gated
activations a program keeps two accumulators, gate (``w13`` rows ``f``) and up (rows ``F + f``), over the
same x tile, so the activation is applied in registers and only ``h_NF`` (N x F) is written. Schedule and
tile configs: see ``moe/kernels/schedule.py``.

Example: ``x_TD = [[1, 2]]`` (T=1, D=2), K=1 routed to expert 0 whose ``w13 = [[1, 0], [0, 1]]``
(F=1: gate row [1, 0], up row [0, 1]), SwiGLU -> ``h_NF = [[silu(1) * 2]] = [[1.4621]]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels.schedule import GemmConfig, autotuned, launch_grouped, program_tile

# Activation name (moe.config.Activation values) -> (kernel code, gated)
ACTIVATIONS = {"swiglu": (0, True), "geglu": (1, True), "swiglu_oai": (2, True), "gelu": (3, False),
               "relu": (4, False), "swiglu_clamped": (5, True)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _activate(gate, up, alpha, limit, ACT: tl.constexpr):
    """fp32 epilogue; the same math as ``moe.activations.expert_activation``."""
    if ACT == 0:
        out = gate * tl.sigmoid(gate) * up
    elif ACT == 1:
        out = _gelu(gate) * up
    elif ACT == 2:  # gpt-oss: gate clamped from above, up both ways, "+1" on up
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = gate * tl.sigmoid(gate * alpha) * (up + 1.0)
    elif ACT == 3:
        out = _gelu(gate)
    elif ACT == 5:  # GLM-5-Next / HY-V4: SwiGLU with the gate clamped from above and up both ways
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = gate * tl.sigmoid(gate) * up
    else:
        out = tl.maximum(gate, 0.0)
    return out


@triton.jit
def act_epilogue(gate, up, rows, row_ok, cols, col_ok, expert, order_ptr, topk_w_ptr, b_ptr, F, stride_be, stride_bx,
                 alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SCALE_INPUT: tl.constexpr):
    """fp32 tiles ``gate``/``up [rows, cols]`` of expert ``expert`` -> x routing weight, + bias -> activation
    (shared with the FP8 kernel). The weight scales the input (Llama 4); linear, so it is applied to the product."""
    if SCALE_INPUT:
        pair = tl.load(order_ptr + rows, mask=row_ok, other=0)
        scale = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
        gate = gate * scale
        up = up * scale
    if HAS_BIAS:
        b_ptrs = b_ptr + expert * stride_be + cols * stride_bx
        gate += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(b_ptrs + F * stride_bx, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return _activate(gate, up, alpha, limit, ACT)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm_act_kernel(
    x_ptr, token_ptr, order_ptr, topk_w_ptr, counts_ptr, w_ptr, b_ptr, h_ptr,
    E, D, F,
    stride_xt, stride_xd, stride_we, stride_wx, stride_wd, stride_be, stride_bx, stride_hn, stride_hf,
    alpha, limit, M_BUCKET,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_INPUT: tl.constexpr,
    E_POW2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 1. which expert, rows and columns this program owns (see schedule.py); empty slots leave at once
    valid, expert, rows, row_ok, cols, col_ok, _ = program_tile(counts_ptr, E, F, BLOCK_M, BLOCK_N, GROUP_M, E_POW2)
    if not valid:
        return
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    # 2. main loop over D: one gathered x tile feeds the gate and the up accumulators
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xd
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wx + ks[:, None] * stride_wd
    up_offset = F * stride_wx
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = ks < D - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        gate = tl.dot(x, tl.load(w_ptrs, mask=w_mask, other=0.0), gate, input_precision=DOT_PRECISION)
        if GATED:
            up = tl.dot(x, tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0), up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    # 3. epilogue: routing weight on the input, bias, activation
    h = act_epilogue(gate, up, rows, row_ok, cols, col_ok, expert, order_ptr, topk_w_ptr, b_ptr, F, stride_be,
                     stride_bx, alpha, limit, ACT, GATED, HAS_BIAS, SCALE_INPUT)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hn + cols[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_gemm_act_tuned = autotuned(_gemm_act_kernel, gemm=1)


def _check(x_TD, token_idx_N, order_N, counts_E, w13_EXD, activation, b13_EX, topk_weights_TK) -> int:
    """Validate the launch; returns F."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation ({activation!r}) must be one of {sorted(ACTIVATIONS)}")
    if x_TD.dim() != 2 or w13_EXD.dim() != 3 or x_TD.shape[1] != w13_EXD.shape[2]:
        raise ValueError(f"x_TD {tuple(x_TD.shape)} and w13_EXD {tuple(w13_EXD.shape)} must be [T, D] and [E, X, D]")
    if x_TD.dtype not in DTYPES or w13_EXD.dtype != x_TD.dtype:
        raise ValueError(f"x_TD ({x_TD.dtype}) and w13_EXD ({w13_EXD.dtype}) must share one of {DTYPES}")
    tensors = [t for t in (x_TD, token_idx_N, order_N, counts_E, w13_EXD, b13_EX, topk_weights_TK) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")
    E, X, D = w13_EXD.shape
    gated = ACTIVATIONS[activation][1]
    if gated and X % 2:
        raise ValueError(f"gated activation {activation!r} needs an even number of w13 rows, got {X}")
    if X * D >= 2**31:
        raise ValueError(f"one expert's w13 ({X} x {D}) must have fewer than 2**31 elements")
    if token_idx_N.dim() != 1 or token_idx_N.dtype != torch.int64 or order_N.shape != token_idx_N.shape:
        raise ValueError(f"token_idx_N ({token_idx_N.dtype}, {tuple(token_idx_N.shape)}) and order_N "
                         f"{tuple(order_N.shape)} must be 1-D int64 of one length N")
    if counts_E.shape != (E,) or counts_E.dtype != torch.int32:
        raise ValueError(f"counts_E ({counts_E.dtype}, {tuple(counts_E.shape)}) must be int32 [{E}]")
    if b13_EX is not None and b13_EX.shape != (E, X):
        raise ValueError(f"b13_EX {tuple(b13_EX.shape)} must be [{E}, {X}]")
    if topk_weights_TK is not None and (topk_weights_TK.dtype != torch.float32 or not topk_weights_TK.is_contiguous()
                                        or topk_weights_TK.numel() != token_idx_N.numel()):
        raise ValueError(f"topk_weights_TK ({topk_weights_TK.dtype}, {tuple(topk_weights_TK.shape)}) must be "
                         f"contiguous fp32 with N={token_idx_N.numel()} elements")
    return X // 2 if gated else X


def gemm_act(
    x_TD: torch.Tensor,
    token_idx_N: torch.Tensor,
    order_N: torch.Tensor,
    counts_E: torch.Tensor,
    w13_EXD: torch.Tensor,
    activation: str = "swiglu",
    b13_EX: torch.Tensor | None = None,
    topk_weights_TK: torch.Tensor | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
    config: GemmConfig | None = None,
    autotune: bool = False,
) -> torch.Tensor:
    """``h_NF[r] = act(w * x_TD[token_idx_N[r]] @ w13[e].T + b13[e])`` for sorted row r of expert e.

    ``token_idx_N``/``order_N``/``counts_E`` come from ``index_shuffle``. ``topk_weights_TK`` given: the
    routing weight of each row (``topk_weights_TK.flat[order_N[r]]``) scales the input (Llama 4); else w=1.
    Returns ``h_NF`` in x's dtype. ``config`` pins a tile config; see ``schedule.launch_grouped``.
    """
    F = _check(x_TD, token_idx_N, order_N, counts_E, w13_EXD, activation, b13_EX, topk_weights_TK)
    E, _, D = w13_EXD.shape
    N = token_idx_N.numel()
    h_NF = torch.empty(N, F, dtype=x_TD.dtype, device=x_TD.device)
    if N == 0:
        return h_NF
    code, gated = ACTIVATIONS[activation]
    bias = b13_EX if b13_EX is not None else w13_EXD  # placeholder pointer when there is no bias
    scale = topk_weights_TK if topk_weights_TK is not None else counts_E
    args = (
        x_TD, token_idx_N, order_N, scale, counts_E, w13_EXD, bias, h_NF,
        E, D, F,
        *x_TD.stride(), *w13_EXD.stride(), bias.stride(0), bias.stride(1), *h_NF.stride(),
        float(alpha), float(limit),
    )
    launch_grouped(
        _gemm_act_kernel, _gemm_act_tuned, 1, args, N, E, F, config, autotune,
        ACT=code, GATED=gated, HAS_BIAS=b13_EX is not None, SCALE_INPUT=topk_weights_TK is not None,
        E_POW2=max(16, triton.next_power_of_2(E)),
        DOT_PRECISION="ieee" if x_TD.dtype == torch.float32 else "tf32",
    )
    return h_NF
