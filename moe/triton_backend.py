"""The ``triton`` backend: one MoE layer's routed experts with the kernels of ``moe/kernels``.

Shape legend: T tokens, D hidden, F expert FFN size, E experts, K top-k, N = T*K routed rows.

The forward is 4 launches at decode sizes (shuffle, zero-fill of y, two GEMMs; 3 when K == 1) and at most
6 for large N or the deterministic combine. None reads a device value on the host, so the whole of it can
be captured in a CUDA graph (run it once eagerly per token bucket first: autotuning and Triton's compilation
happen on first use):

1. ``index_shuffle``: stable expert order, ``counts_E`` (1 launch for decode-sized N, 3 for large N).
2. ``gemm_act``: gathered ``x_TD`` rows ``@ w13.T`` + bias, activation in the epilogue -> ``h_NF``.
3. ``gemm_combine``: ``h_NF @ w2.T`` + bias, times the routing weight, back to tokens (atomic scatter-add,
   or a deterministic store + fixed-order sum over K) -> ``y_TD`` (fp32).

Triton is imported here lazily, so ``import moe`` works without it.
"""

from __future__ import annotations

import torch

from moe.config import MoEConfig
from moe.experts import Experts
from quant.fp8_experts import Fp8Experts
from routing.router import Routing


def check_supported(config: MoEConfig) -> None:
    """Raise ``ValueError`` at construction for configs the Triton kernels cannot run."""
    from moe.kernels.index_shuffle import MAX_EXPERTS

    if config.num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts ({config.num_experts}) must be <= {MAX_EXPERTS} for backend='triton'")
    for name, numel in (("w13", config.w13_rows * config.hidden_size), ("w2", config.hidden_size * config.ffn_size)):
        if numel >= 2**31:
            raise ValueError(f"one expert's {name} has {numel} elements; backend='triton' needs fewer than 2**31")


def triton_moe_forward(
    x_TD: torch.Tensor, routing: Routing, experts: Experts | Fp8Experts, deterministic: bool, autotune: bool = True
) -> torch.Tensor:
    """``y_TD = sum_k w_tk * expert_{id_tk}(x_t)`` (or the weight on the input when ``routing.apply_on_input``),
    fp32 ``[T, D]``; the same math as :func:`moe.reference.reference_moe`. Inference only.

    ``deterministic``: no atomics, a fixed summation order and one tile config for every T (batch-invariant).
    ``autotune``: on a GPU, benchmark a few tile configs per token bucket on first use (ignored when
    deterministic and under the Triton interpreter, which use the default table).
    ``Fp8Experts`` run the FP8 grouped GEMMs (``moe/kernels/fp8_grouped_gemm.py``): activations quantised per
    token and 128 columns, fp32 accumulation; the FP8 table's tile configs (no autotuning yet).
    """
    from moe.kernels.gemm_act import gemm_act
    from moe.kernels.gemm_combine import gemm_combine
    from moe.kernels.index_shuffle import index_shuffle
    from moe.kernels.schedule import BATCH_INVARIANT

    if torch.is_grad_enabled() and (x_TD.requires_grad or any(p.requires_grad for p in experts.parameters())):
        raise RuntimeError(
            "backend='triton' is inference-only (its kernels have no backward): run under torch.no_grad() or "
            "torch.inference_mode(), or use backend='torch' to train"
        )
    if isinstance(experts, Fp8Experts):
        return _fp8_forward(x_TD, routing, experts, deterministic)
    cfg = experts.config
    w13_EXD, w2_EDF = experts.w13_E2FD, experts.w2_EDF
    x_TD = x_TD.to(w13_EXD.dtype)
    weights_TK = routing.weights_TK.float().contiguous()
    config1, config2 = BATCH_INVARIANT if deterministic else (None, None)
    tune = autotune and not deterministic

    # 1. counting sort of the routed rows by expert, on the device
    order_N, token_idx_N, _, counts_E, _ = index_shuffle(routing.ids_TK.contiguous(), experts.num_experts)
    # 2. gathered rows @ w13 -> activation -> h_NF (the routing weight scales the input for Llama 4)
    h_NF = gemm_act(
        x_TD, token_idx_N, order_N, counts_E, w13_EXD, cfg.activation.value, experts.b13_E2F,
        weights_TK if routing.apply_on_input else None, cfg.swiglu_alpha, cfg.swiglu_limit,
        config=config1, autotune=tune,
    )
    # 3. h_NF @ w2 -> weighted sum back to the tokens
    return gemm_combine(
        h_NF, token_idx_N, order_N, counts_E, w2_EDF, weights_TK, experts.b2_ED,
        weighted=not routing.apply_on_input, deterministic=deterministic, config=config2, autotune=tune,
    )


def _fp8_forward(x_TD: torch.Tensor, routing: Routing, experts: Fp8Experts, deterministic: bool) -> torch.Tensor:
    """The FP8 launches: shuffle, ``group_quant(x_TD)``, GEMM 1 (+ quantised h), GEMM 2 + combine."""
    from moe.kernels.fp8_grouped_gemm import BATCH_INVARIANT, fp8_gemm_act, fp8_gemm_combine, group_quant
    from moe.kernels.index_shuffle import index_shuffle

    cfg = experts.config
    scheme = experts.scheme.value
    weights_TK = routing.weights_TK.float().contiguous()
    config = BATCH_INVARIANT if deterministic else None
    # 1. counting sort of the routed rows by expert; 2. x_TD in e4m3, one scale per token and 128 columns
    order_N, token_idx_N, _, counts_E, _ = index_shuffle(routing.ids_TK.contiguous(), experts.num_experts)
    xq_TD, x_scale_TG = group_quant(x_TD)
    # 3. gathered rows @ w13 -> activation -> h_NF, quantised per row and 128 columns in the epilogue
    hq_NF, h_scale_NG = fp8_gemm_act(
        xq_TD, x_scale_TG, token_idx_N, order_N, counts_E, experts.w13_E2FD, experts.w13_scale, scheme,
        cfg.activation.value, experts.b13_E2F, weights_TK if routing.apply_on_input else None,
        cfg.swiglu_alpha, cfg.swiglu_limit, config=config,
    )
    # 4. h_NF @ w2 -> weighted sum back to the tokens
    return fp8_gemm_combine(
        hq_NF, h_scale_NG, token_idx_N, order_N, counts_E, experts.w2_EDF, experts.w2_scale, scheme, weights_TK,
        experts.b2_ED, weighted=not routing.apply_on_input, deterministic=deterministic, config=config,
    )
