"""FP8 grouped GEMMs: ``gemm_act`` and ``gemm_combine`` on e4m3 operands with fp32 accumulation.

Shape legend: T tokens, D hidden, F expert FFN size, X = 2F (gated) or F rows of ``w13``, E experts,
N = T*K routed rows sorted by expert, M rows of one tile, G = 128 columns of a quantisation group.

The schedule, row gather, activation epilogue and combine are those of ``gemm_act.py`` / ``gemm_combine.py``,
shared as jit helpers: ``schedule.program_tile`` (tile lookup, row and column masks), ``gemm_act.act_epilogue``
(routing weight on the input, bias, activation) and ``gemm_combine.combine_epilogue`` (bias, routing weight,
atomic or deterministic combine). What changes is the operands, following DeepSeek-V3's recipe with "dynamic"
activation scales:

- activations: e4m3 with one fp32 scale per token and group of G columns (1x128). :func:`group_quant` does
  ``x_TD`` (once per token, not per routed row); GEMM 1's epilogue does ``h_NF``, its column tile being
  exactly one group, so GEMM 2 reads e4m3 ``h`` (a quarter of fp32's bytes) and never a high-precision copy.
- weights: e4m3 with fp32 scales per output row (``channel``, ``[E, rows]``) or per 128x128 block
  (``block``, DeepSeek-V3 ``weight_scale_inv``, ``[E, row blocks, column blocks]``). ``w13``'s up half has
  scale rows of its own, starting at ``up_scale_row`` (``F`` for channel, ``ceil(F/128)`` for block).
- the K loop steps one group at a time (BLOCK_K = G): ``acc += dot(a_q, w_q) * a_scale[:, None] *
  w_scale[None, :]``. Both scales are constant within a step, so they apply in fp32 right after each
  128-deep MMA (DeepSeek-V3's promotion interval for Hopper's limited-precision FP8 accumulation).
- D and F need not be multiples of 128: loads past them are masked to zero (padding), nothing is refused.

Example (the unit test runs it): x_TD = [[2.0, -1.0]] (D=2) -> group scale 2/448, x_q = [[448, -224]];
w13 = [[1.0, 0.5]] (F=1, relu, channel) -> w_q = [[448, 224]], w_scale = [1/448];
dot = 448*448 - 224*224 = 150528, times (2/448) * (1/448) = 1.5 = relu(2*1 - 1*0.5) -> h_NF = [[1.5]].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels.gemm_act import ACTIVATIONS, act_epilogue
from moe.kernels.gemm_combine import combine_buffer, combine_epilogue, combine_finish
from moe.kernels.schedule import MAX_ROWS_BUCKET, GemmConfig, launch_grouped, program_tile, rows_bucket

FP8 = torch.float8_e4m3fn
GROUP = 128
SCHEMES = {"channel": 1, "block": GROUP}  # scheme -> output rows sharing one weight scale
IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (max rows bucket, GEMM 1, GEMM 2). BLOCK_K is the group (one scale per operand per step); GEMM 1's BLOCK_N
# too (its epilogue quantises h one group per tile). Decode buckets stream weights with small row tiles.
_TABLE = (
    (16, GemmConfig(16, GROUP, GROUP, 1, 4, 3), GemmConfig(16, GROUP, GROUP, 1, 4, 3)),
    (64, GemmConfig(32, GROUP, GROUP, 1, 4, 3), GemmConfig(32, GROUP, GROUP, 1, 4, 3)),
    (MAX_ROWS_BUCKET, GemmConfig(64, GROUP, GROUP, 8, 4, 3), GemmConfig(64, GROUP, GROUP, 8, 4, 3)),
)
BATCH_INVARIANT = GemmConfig(64, GROUP, GROUP, 8, 4, 3)


def fp8_config(gemm: int, num_rows: int, num_experts: int, deterministic: bool = False) -> GemmConfig:
    """The tile config for GEMM ``gemm`` (1 or 2) at ``num_rows`` routed rows; one config for every T when
    deterministic (batch-invariant)."""
    if deterministic:
        return BATCH_INVARIANT
    bucket = rows_bucket(num_rows, num_experts)
    return next(cfg1 if gemm == 1 else cfg2 for max_bucket, cfg1, cfg2 in _TABLE if bucket <= max_bucket)


@triton.jit
def _to_e4m3(v):
    """fp32 ``v`` (``|v| <= 448``) -> e4m3, nearest, ties to even. It rounds on the fp32 grid first so the cast
    is exact: Triton's interpreter drops the exponent carry when its own cast rounds up to a power of two
    (31.1 -> 16.0)."""
    bits = v.to(tl.int32, bitcast=True)
    step_exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3  # 3 mantissa bits; subnormal below 2^-6
    step = ((step_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - step_exp) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding then subtracting it rounds |y| < 2^22 to an integer, ties to even
    return (((v * inv_step + magic) - magic) * step).to(tl.float8e4nv)


@triton.jit
def _quantize_rows(v):
    """Per row of ``v [M, G]``: ``scale = max|v| / 448`` (at least fp32's smallest normal), ``q = v / scale``;
    the same math as ``quant.fp8.quantize_activation``."""
    scale = tl.maximum(tl.max(tl.abs(v), axis=1) / 448.0, 1.1754943508222875e-38)
    return _to_e4m3(tl.clamp(v / scale[:, None], -448.0, 448.0)), scale


@triton.jit
def _group_quant_kernel(x_ptr, q_ptr, s_ptr, T, D, stride_xt, stride_xd, stride_qt, stride_qd, stride_st,
                        BLOCK_T: tl.constexpr, G: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * G + tl.arange(0, G)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xd, mask=mask, other=0.0)
    q, scale = _quantize_rows(x.to(tl.float32))
    tl.store(q_ptr + rows[:, None] * stride_qt + cols[None, :] * stride_qd, q, mask=mask)
    tl.store(s_ptr + rows * stride_st + tl.program_id(1), scale, mask=rows < T)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _fp8_gemm_act_kernel(
    x_ptr, xs_ptr, token_ptr, order_ptr, topk_w_ptr, counts_ptr, w_ptr, ws_ptr, b_ptr, h_ptr, hs_ptr,
    E, D, F, up_scale_row,
    stride_xt, stride_xd, stride_xst, stride_xsg, stride_we, stride_wx, stride_wd, stride_wse, stride_wsx,
    stride_wsg, stride_be, stride_bx, stride_hn, stride_hf, stride_hsn, stride_hsg,
    alpha, limit, M_BUCKET,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_INPUT: tl.constexpr,
    W_SCALE_ROWS: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 1. which expert, rows and columns this program owns (see schedule.py); empty slots leave at once
    valid, expert, rows, row_ok, cols, col_ok, col_tile = program_tile(counts_ptr, E, F, BLOCK_M, BLOCK_N, GROUP_M,
                                                                       E_POW2)
    if not valid:
        return
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    # 2. K loop, one group per step: e4m3 MMA, then the token's and the weight rows' scales in fp32
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xd
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wx + ks[:, None] * stride_wd
    ws_ptrs = ws_ptr + expert.to(tl.int64) * stride_wse + (cols // W_SCALE_ROWS) * stride_wsx
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, tl.cdiv(D, BLOCK_K)):
        k_ok = ks < D - g * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x_scale = tl.load(xs_ptr + tokens * stride_xst + g * stride_xsg, mask=row_ok, other=0.0)[:, None]
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_scale = tl.load(ws_ptrs + g * stride_wsg, mask=col_ok, other=0.0)[None, :]
        gate += tl.dot(x, tl.load(w_ptrs, mask=w_mask, other=0.0)) * x_scale * w_scale
        if GATED:
            w_scale = tl.load(ws_ptrs + up_scale_row * stride_wsx + g * stride_wsg, mask=col_ok, other=0.0)[None, :]
            up += tl.dot(x, tl.load(w_ptrs + F * stride_wx, mask=w_mask, other=0.0)) * x_scale * w_scale
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    # 3. epilogue: routing weight on the input (Llama 4), bias, activation: gemm_act's
    h = act_epilogue(gate, up, rows, row_ok, cols, col_ok, expert, order_ptr, topk_w_ptr, b_ptr, F, stride_be,
                     stride_bx, alpha, limit, ACT, GATED, HAS_BIAS, SCALE_INPUT)
    h = tl.where(col_ok[None, :], h, 0.0)
    # 4. GEMM 2's input: this tile's columns are one group, quantised per row
    h_q, h_scale = _quantize_rows(h)
    rows64 = rows.to(tl.int64)
    h_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(h_ptr + rows64[:, None] * stride_hn + cols[None, :] * stride_hf, h_q, mask=h_mask)
    tl.store(hs_ptr + rows64 * stride_hsn + col_tile * stride_hsg, h_scale, mask=row_ok)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _fp8_gemm_combine_kernel(
    h_ptr, hs_ptr, token_ptr, order_ptr, topk_w_ptr, counts_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    E, D, F,
    stride_hn, stride_hf, stride_hsn, stride_hsg, stride_we, stride_wd, stride_wf, stride_wse, stride_wsd,
    stride_wsg, stride_be, stride_bd, stride_yr, stride_yd,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, SCALE_OUTPUT: tl.constexpr, ATOMIC: tl.constexpr, W_SCALE_ROWS: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 1. expert, rows and output columns of this program (see schedule.py); empty slots leave at once
    valid, expert, rows, row_ok, cols, col_ok, _ = program_tile(counts_ptr, E, D, BLOCK_M, BLOCK_N, GROUP_M, E_POW2)
    if not valid:
        return
    ks = tl.arange(0, BLOCK_K)
    # 2. K loop over F, one group per step; h rows are already contiguous in expert order
    rows64 = rows.to(tl.int64)
    h_ptrs = h_ptr + rows64[:, None] * stride_hn + ks[None, :] * stride_hf
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wd + ks[:, None] * stride_wf
    ws_ptrs = ws_ptr + expert.to(tl.int64) * stride_wse + (cols // W_SCALE_ROWS) * stride_wsd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, tl.cdiv(F, BLOCK_K)):
        k_ok = ks < F - g * BLOCK_K
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        h_scale = tl.load(hs_ptr + rows64 * stride_hsn + g * stride_hsg, mask=row_ok, other=0.0)[:, None]
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        w_scale = tl.load(ws_ptrs + g * stride_wsg, mask=col_ok, other=0.0)[None, :]
        acc += tl.dot(h, w) * h_scale * w_scale
        h_ptrs += BLOCK_K * stride_hf
        w_ptrs += BLOCK_K * stride_wf
    # 3. epilogue: bias, routing weight, then scatter-add by token or store by pair index (gemm_combine's)
    combine_epilogue(acc, rows, row_ok, cols, col_ok, expert, token_ptr, order_ptr, topk_w_ptr, b_ptr, y_ptr,
                     stride_be, stride_bd, stride_yr, stride_yd, HAS_BIAS, SCALE_OUTPUT, ATOMIC)


def _same_device(*tensors) -> None:
    devices = {str(t.device) for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(devices)}")


def _check_rows(token_idx_N, order_N, counts_E, E: int) -> None:
    N = token_idx_N.numel()
    for name, t in (("token_idx_N", token_idx_N), ("order_N", order_N)):
        if t.shape != (N,) or t.dtype != torch.int64:
            raise ValueError(f"{name} ({t.dtype}, {tuple(t.shape)}) must be int64 [{N}]")
    if counts_E.shape != (E,) or counts_E.dtype != torch.int32:
        raise ValueError(f"counts_E ({counts_E.dtype}, {tuple(counts_E.shape)}) must be int32 [{E}]")


def _check_fp8(name: str, t: torch.Tensor, scale: torch.Tensor, shape: tuple, scale_shape: tuple) -> None:
    if t.dtype != FP8 or tuple(t.shape) != shape:
        raise ValueError(f"{name} ({t.dtype}, {tuple(t.shape)}) must be {FP8} {shape}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != scale_shape:
        raise ValueError(f"{name}'s scale ({scale.dtype}, {tuple(scale.shape)}) must be fp32 {scale_shape}")


def _weight_scales(name: str, w: torch.Tensor, scale: torch.Tensor, scheme: str, halves: int) -> tuple[int, tuple]:
    """Check ``w [E, rows, cols]`` and its scales; returns (first scale row of the second half, scale strides)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme ({scheme!r}) must be one of {sorted(SCHEMES)}")
    if w.dim() != 3 or w.shape[1] % halves or w.shape[1] * w.shape[2] >= 2**31:
        raise ValueError(f"{name} {tuple(w.shape)} must be [E, rows, cols] with {halves} halves of rows and "
                         "fewer than 2**31 elements per expert")
    E, rows, cols = w.shape
    per_half = rows // halves if scheme == "channel" else triton.cdiv(rows // halves, GROUP)
    scale_shape = (E, rows) if scheme == "channel" else (E, halves * per_half, triton.cdiv(cols, GROUP))
    _check_fp8(name, w, scale, tuple(w.shape), scale_shape)
    return per_half, (*scale.stride()[:2], scale.stride(2) if scheme == "block" else 0)


def _check_config(config: GemmConfig, gemm: int) -> None:
    if config.block_k != GROUP or (gemm == 1 and config.block_n != GROUP):
        raise ValueError(f"config {config}: FP8 GEMM {gemm} needs block_k{' and block_n' if gemm == 1 else ''} "
                         f"= {GROUP} (one quantisation group per step)")


def group_quant(x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_TD`` -> ``(q_TD e4m3, scale_TG fp32)`` with G = ceil(D/128): one scale per token and 128 columns,
    the math of ``quant.fp8.quantize_activation``."""
    if x_TD.dim() != 2 or x_TD.dtype not in IN_DTYPES:
        raise ValueError(f"x_TD ({x_TD.dtype}, {tuple(x_TD.shape)}) must be 2-D, one of {IN_DTYPES}")
    T, D = x_TD.shape
    q_TD = torch.empty(T, D, dtype=FP8, device=x_TD.device)
    scale_TG = torch.empty(T, triton.cdiv(D, GROUP), dtype=torch.float32, device=x_TD.device)
    if T and D:
        BLOCK_T = 16
        _group_quant_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(D, GROUP))](
            x_TD, q_TD, scale_TG, T, D, *x_TD.stride(), *q_TD.stride(), scale_TG.stride(0), BLOCK_T=BLOCK_T, G=GROUP)
    return q_TD, scale_TG


def fp8_gemm_act(
    x_TD: torch.Tensor, x_scale_TG: torch.Tensor, token_idx_N: torch.Tensor, order_N: torch.Tensor,
    counts_E: torch.Tensor, w13_EXD: torch.Tensor, w13_scale: torch.Tensor, scheme: str,
    activation: str = "swiglu", b13_EX: torch.Tensor | None = None, topk_weights_TK: torch.Tensor | None = None,
    alpha: float = 1.702, limit: float = 7.0, config: GemmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_NF[r] = act(w * dq(x_TD)[token_idx_N[r]] @ dq(w13[e]).T + b13[e])``, returned quantised:
    ``(h_NF e4m3, h_scale_NG fp32)`` with one scale per row and 128 columns (GEMM 2's input).

    ``x_TD``/``x_scale_TG`` from :func:`group_quant`; rows, counts and ``topk_weights_TK`` as in ``gemm_act``;
    ``w13_scale`` in ``scheme``'s layout (see the module docstring). ``config`` pins a tile config.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation ({activation!r}) must be one of {sorted(ACTIVATIONS)}")
    code, gated = ACTIVATIONS[activation]
    up_scale_row, ws_strides = _weight_scales("w13_EXD", w13_EXD, w13_scale, scheme, 2 if gated else 1)
    E, X, D = w13_EXD.shape
    F = X // 2 if gated else X
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD {tuple(x_TD.shape)} must be [T, D]")
    _check_fp8("x_TD", x_TD, x_scale_TG, (x_TD.shape[0], D), (x_TD.shape[0], triton.cdiv(D, GROUP)))
    _check_rows(token_idx_N, order_N, counts_E, E)
    N = token_idx_N.numel()
    if b13_EX is not None and b13_EX.shape != (E, X):
        raise ValueError(f"b13_EX {tuple(b13_EX.shape)} must be [{E}, {X}]")
    if topk_weights_TK is not None and (topk_weights_TK.dtype != torch.float32 or topk_weights_TK.numel() != N
                                        or not topk_weights_TK.is_contiguous()):
        raise ValueError(f"topk_weights_TK ({topk_weights_TK.dtype}, {tuple(topk_weights_TK.shape)}) must be "
                         f"contiguous fp32 with N={N} elements")
    _same_device(x_TD, x_scale_TG, token_idx_N, order_N, counts_E, w13_EXD, w13_scale, b13_EX, topk_weights_TK)
    h_NF = torch.empty(N, F, dtype=FP8, device=x_TD.device)
    h_scale_NG = torch.empty(N, triton.cdiv(F, GROUP), dtype=torch.float32, device=x_TD.device)
    if N == 0:
        return h_NF, h_scale_NG
    config = config or fp8_config(1, N, E)
    _check_config(config, 1)
    bias = b13_EX if b13_EX is not None else x_scale_TG  # placeholder pointer when there is no bias
    weights = topk_weights_TK if topk_weights_TK is not None else counts_E
    args = (
        x_TD, x_scale_TG, token_idx_N, order_N, weights, counts_E, w13_EXD, w13_scale, bias, h_NF, h_scale_NG,
        E, D, F, up_scale_row,
        *x_TD.stride(), *x_scale_TG.stride(), *w13_EXD.stride(), *ws_strides, bias.stride(0), bias.stride(1),
        *h_NF.stride(), *h_scale_NG.stride(), float(alpha), float(limit),
    )
    launch_grouped(
        _fp8_gemm_act_kernel, None, 1, args, N, E, F, config, False,
        ACT=code, GATED=gated, HAS_BIAS=b13_EX is not None, SCALE_INPUT=topk_weights_TK is not None,
        W_SCALE_ROWS=SCHEMES[scheme], E_POW2=max(16, triton.next_power_of_2(E)),
    )
    return h_NF, h_scale_NG


def fp8_gemm_combine(
    h_NF: torch.Tensor, h_scale_NG: torch.Tensor, token_idx_N: torch.Tensor, order_N: torch.Tensor,
    counts_E: torch.Tensor, w2_EDF: torch.Tensor, w2_scale: torch.Tensor, scheme: str,
    topk_weights_TK: torch.Tensor, b2_ED: torch.Tensor | None = None, weighted: bool = True,
    deterministic: bool = False, config: GemmConfig | None = None,
) -> torch.Tensor:
    """``y_TD[t] = sum_k w[t, k] * (dq(h_NF)[r(t, k)] @ dq(w2[e]).T + b2[e])`` in fp32, ``[T, D]``; the combine
    (atomic or deterministic) and arguments of ``gemm_combine``, with :func:`fp8_gemm_act`'s ``h``."""
    _, ws_strides = _weight_scales("w2_EDF", w2_EDF, w2_scale, scheme, 1)
    E, D, F = w2_EDF.shape
    N = token_idx_N.numel()
    _check_fp8("h_NF", h_NF, h_scale_NG, (N, F), (N, triton.cdiv(F, GROUP)))
    _check_rows(token_idx_N, order_N, counts_E, E)
    if (topk_weights_TK.dim() != 2 or topk_weights_TK.numel() != N or topk_weights_TK.dtype != torch.float32
            or not topk_weights_TK.is_contiguous()):
        raise ValueError(f"topk_weights_TK ({topk_weights_TK.dtype}, {tuple(topk_weights_TK.shape)}) must be "
                         f"contiguous fp32 [T, K] with T*K = N = {N}")
    if b2_ED is not None and b2_ED.shape != (E, D):
        raise ValueError(f"b2_ED {tuple(b2_ED.shape)} must be [{E}, {D}]")
    _same_device(h_NF, h_scale_NG, token_idx_N, order_N, counts_E, w2_EDF, w2_scale, topk_weights_TK, b2_ED)
    T, K = topk_weights_TK.shape
    if N == 0:
        return torch.zeros(T, D, dtype=torch.float32, device=h_NF.device)
    config = config or fp8_config(2, N, E, deterministic)
    _check_config(config, 2)
    out, atomic = combine_buffer(T, K, D, deterministic, h_NF.device)
    bias = b2_ED if b2_ED is not None else h_scale_NG  # placeholder pointer when there is no bias
    args = (
        h_NF, h_scale_NG, token_idx_N, order_N, topk_weights_TK, counts_E, w2_EDF, w2_scale, bias, out,
        E, D, F,
        *h_NF.stride(), *h_scale_NG.stride(), *w2_EDF.stride(), *ws_strides, *bias.stride(), *out.stride(),
    )
    launch_grouped(
        _fp8_gemm_combine_kernel, None, 2, args, N, E, D, config, False,
        HAS_BIAS=b2_ED is not None, SCALE_OUTPUT=weighted, ATOMIC=atomic, W_SCALE_ROWS=SCHEMES[scheme],
        E_POW2=max(16, triton.next_power_of_2(E)),
    )
    return combine_finish(out, T, K, atomic)
