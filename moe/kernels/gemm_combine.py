"""Grouped GEMM 2 with the combine fused: ``h_NF @ w2[e].T``, times the routing weight, back to tokens.

Shape legend: T tokens, D hidden, F expert FFN size, E experts, K top-k, N = T*K routed rows sorted by
expert (row ``n = t*K + k`` of the flat ``topk_*_TK`` is the pair (token t, its k-th choice)).

Two ways back to token order, both fp32:

- **atomic** (default): each tile scatter-adds ``w * (h @ w2.T + b2)`` into ``y_TD`` with relaxed fp32
  atomics. One launch plus the zero-fill; the summation order over K varies run to run (last-bit noise).
- **deterministic**: each tile stores its rows at their pair index ``n`` of a ``[N, D]`` fp32 buffer (no
  two rows share one), then ``_sum_over_k_kernel`` adds ``k = 0 .. K-1`` in that fixed order. Results are
  bitwise reproducible and, with a fixed tile config (``schedule.BATCH_INVARIANT``), batch-invariant.
- K == 1 needs neither: pair index n is token t, so tiles store straight into ``y_TD`` in both modes.

Example: T=1, K=2, the token routed to experts 0 and 1 with weights 0.25 and 0.75, ``h_NF @ w2.T`` giving
rows [[4.0]] (expert 0) and [[8.0]] (expert 1) -> ``y_TD = [[0.25 * 4 + 0.75 * 8]] = [[7.0]]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels.schedule import GemmConfig, autotuned, launch_grouped, program_tile

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm_combine_kernel(
    h_ptr, token_ptr, order_ptr, topk_w_ptr, counts_ptr, w_ptr, b_ptr, y_ptr,
    E, D, F,
    stride_hn, stride_hf, stride_we, stride_wd, stride_wf, stride_be, stride_bd, stride_yr, stride_yd,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, SCALE_OUTPUT: tl.constexpr, ATOMIC: tl.constexpr,
    E_POW2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 1. expert, rows and output columns of this program (see schedule.py); empty slots leave at once
    valid, expert, rows, row_ok, cols, col_ok, _ = program_tile(counts_ptr, E, D, BLOCK_M, BLOCK_N, GROUP_M, E_POW2)
    if not valid:
        return
    ks = tl.arange(0, BLOCK_K)
    # 2. main loop over F; h rows are already contiguous in expert order
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hn + ks[None, :] * stride_hf
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wd + ks[:, None] * stride_wf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_ok = ks < F - k0
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hf
        w_ptrs += BLOCK_K * stride_wf
    # 3. epilogue: bias, routing weight, then scatter-add by token or store by pair index
    combine_epilogue(acc, rows, row_ok, cols, col_ok, expert, token_ptr, order_ptr, topk_w_ptr, b_ptr, y_ptr,
                     stride_be, stride_bd, stride_yr, stride_yd, HAS_BIAS, SCALE_OUTPUT, ATOMIC)


@triton.jit
def combine_epilogue(acc, rows, row_ok, cols, col_ok, expert, token_ptr, order_ptr, topk_w_ptr, b_ptr, y_ptr,
                     stride_be, stride_bd, stride_yr, stride_yd,
                     HAS_BIAS: tl.constexpr, SCALE_OUTPUT: tl.constexpr, ATOMIC: tl.constexpr):
    """fp32 tile ``acc [rows, cols]`` of expert ``expert`` -> + bias, x routing weight -> ``y`` (shared with the
    FP8 kernel)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + cols * stride_bd, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    pair = tl.load(order_ptr + rows, mask=row_ok, other=0)
    if SCALE_OUTPUT:
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if ATOMIC:
        tokens = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        y_ptrs = y_ptr + tokens[:, None] * stride_yr + cols[None, :] * stride_yd
        tl.atomic_add(y_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * stride_yr + cols[None, :] * stride_yd
        tl.store(y_ptrs, acc, mask=out_mask)


@triton.jit
def _sum_over_k_kernel(buf_ptr, y_ptr, T, D, K, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``y[t, :] = sum_{k = 0 .. K-1} buf[t*K + k, :]`` in that order (both contiguous fp32)."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (d < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(0, K):
        acc += tl.load(buf_ptr + (t * K + k)[:, None] * D + d[None, :], mask=mask, other=0.0)
    tl.store(y_ptr + t[:, None] * D + d[None, :], acc, mask=mask)


_gemm_combine_tuned = autotuned(_gemm_combine_kernel, gemm=2, restore_value=["y_ptr"])


def _check(h_NF, token_idx_N, order_N, counts_E, w2_EDF, topk_weights_TK, b2_ED) -> None:
    if h_NF.dim() != 2 or w2_EDF.dim() != 3 or h_NF.shape[1] != w2_EDF.shape[2]:
        raise ValueError(f"h_NF {tuple(h_NF.shape)} and w2_EDF {tuple(w2_EDF.shape)} must be [N, F] and [E, D, F]")
    if h_NF.dtype not in DTYPES or w2_EDF.dtype != h_NF.dtype:
        raise ValueError(f"h_NF ({h_NF.dtype}) and w2_EDF ({w2_EDF.dtype}) must share one of {DTYPES}")
    tensors = [t for t in (h_NF, token_idx_N, order_N, counts_E, w2_EDF, topk_weights_TK, b2_ED) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")
    E, D, F = w2_EDF.shape
    N = h_NF.shape[0]
    if D * F >= 2**31:
        raise ValueError(f"one expert's w2 ({D} x {F}) must have fewer than 2**31 elements")
    for name, t in (("token_idx_N", token_idx_N), ("order_N", order_N)):
        if t.shape != (N,) or t.dtype != torch.int64:
            raise ValueError(f"{name} ({t.dtype}, {tuple(t.shape)}) must be int64 [{N}]")
    if counts_E.shape != (E,) or counts_E.dtype != torch.int32:
        raise ValueError(f"counts_E ({counts_E.dtype}, {tuple(counts_E.shape)}) must be int32 [{E}]")
    if (topk_weights_TK.dim() != 2 or topk_weights_TK.numel() != N or topk_weights_TK.dtype != torch.float32
            or not topk_weights_TK.is_contiguous()):
        raise ValueError(f"topk_weights_TK ({topk_weights_TK.dtype}, {tuple(topk_weights_TK.shape)}) must be "
                         f"contiguous fp32 [T, K] with T*K = N = {N}")
    if b2_ED is not None and b2_ED.shape != (E, D):
        raise ValueError(f"b2_ED {tuple(b2_ED.shape)} must be [{E}, {D}]")


def gemm_combine(
    h_NF: torch.Tensor,
    token_idx_N: torch.Tensor,
    order_N: torch.Tensor,
    counts_E: torch.Tensor,
    w2_EDF: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    b2_ED: torch.Tensor | None = None,
    weighted: bool = True,
    deterministic: bool = False,
    config: GemmConfig | None = None,
    autotune: bool = False,
) -> torch.Tensor:
    """``y_TD[t] = sum_k w[t, k] * (h_NF[r(t, k)] @ w2[e].T + b2[e])`` in fp32, ``[T, D]``.

    ``weighted=False`` leaves the weight out (it already scaled the input). ``topk_weights_TK`` also gives
    T and K. ``deterministic`` picks the atomic-free combine; ``config`` pins a tile config.
    """
    _check(h_NF, token_idx_N, order_N, counts_E, w2_EDF, topk_weights_TK, b2_ED)
    E, D, F = w2_EDF.shape
    T, K = topk_weights_TK.shape
    N, dev = h_NF.shape[0], h_NF.device
    if N == 0:
        return torch.zeros(T, D, dtype=torch.float32, device=dev)
    out_RD, atomic = combine_buffer(T, K, D, deterministic, dev)
    bias = b2_ED if b2_ED is not None else counts_E.view(1, -1)  # placeholder pointer when there is no bias
    args = (
        h_NF, token_idx_N, order_N, topk_weights_TK, counts_E, w2_EDF, bias, out_RD,
        E, D, F,
        *h_NF.stride(), *w2_EDF.stride(), *bias.stride(), *out_RD.stride(),
    )
    launch_grouped(
        _gemm_combine_kernel, _gemm_combine_tuned, 2, args, N, E, D, config, autotune,
        HAS_BIAS=b2_ED is not None, SCALE_OUTPUT=weighted, ATOMIC=atomic,
        E_POW2=max(16, triton.next_power_of_2(E)),
        DOT_PRECISION="ieee" if h_NF.dtype == torch.float32 else "tf32",
    )
    return combine_finish(out_RD, T, K, atomic)


def combine_buffer(T: int, K: int, D: int, deterministic: bool, device) -> tuple[torch.Tensor, bool]:
    """``(out, atomic)``: where the combine tiles write (``y_TD`` itself, zeroed when atomic; or the ``[N, D]``
    pair buffer of the deterministic combine) and whether they scatter-add."""
    atomic = K > 1 and not deterministic
    if K == 1 or atomic:  # K == 1: pair index n is the token t
        return (torch.zeros if atomic else torch.empty)(T, D, dtype=torch.float32, device=device), atomic
    return torch.empty(T * K, D, dtype=torch.float32, device=device), atomic


def combine_finish(out: torch.Tensor, T: int, K: int, atomic: bool) -> torch.Tensor:
    """``y_TD`` from :func:`combine_buffer`'s ``out`` once the tiles have written it."""
    if K == 1 or atomic:
        return out
    D = out.shape[1]
    y_TD = torch.empty(T, D, dtype=torch.float32, device=out.device)
    BLOCK_T, BLOCK_D = 16, min(256, triton.next_power_of_2(D))
    _sum_over_k_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))](out, y_TD, T, D, K, BLOCK_T, BLOCK_D)
    return y_TD
