"""The plain-torch oracle for every MoE backend: a loop over experts with fp32 accumulation.

Readable rather than fast. Tests compare every backend, kernel and parallel layout to these functions;
nothing else re-implements them.

Shape legend: T tokens, D hidden, F expert FFN size, E experts, K top-k, N = T*K routed rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from moe.activations import expert_activation
from moe.config import Activation


def reference_shuffle(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort routed rows by expert, stable; returns ``(token_idx_N, expert_of_N, counts_E)`` (int32).

    Row ``n = t*K + k`` of the flattened ``ids_TK`` is the pair (token t, its k-th expert).
    Example: ``ids_TK = [[1, 0], [1, 2]]`` (E=3) -> rows by expert: e0: (t0), e1: (t0, t1), e2: (t1), so
    ``token_idx_N = [0, 0, 1, 1]``, ``expert_of_N = [0, 1, 1, 2]``, ``counts_E = [1, 2, 1]``.
    """
    flat = ids_TK.reshape(-1).tolist()
    K = ids_TK.shape[1] if ids_TK.dim() == 2 else 1
    token_idx, expert_of = [], []
    for e in range(num_experts):
        for n, chosen in enumerate(flat):
            if chosen == e:
                token_idx.append(n // K)
                expert_of.append(e)
    counts = [expert_of.count(e) for e in range(num_experts)]
    def as_int(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=ids_TK.device)

    return as_int(token_idx), as_int(expert_of), as_int(counts)


def reference_expert(
    x_MD: torch.Tensor,
    w13_RD: torch.Tensor,
    w2_DF: torch.Tensor,
    activation: Activation,
    b13_R: torch.Tensor | None = None,
    b2_D: torch.Tensor | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
    input_quant: Callable[[torch.Tensor], torch.Tensor] | None = None,
    softcaps: tuple[float, float] = (4.0, 25.0),
) -> torch.Tensor:
    """One expert MLP in fp32: ``x [M, D] -> [M, D]``; ``w13`` has ``R = 2F`` (gated) or ``F`` rows.

    ``input_quant`` (row-wise, e.g. ``quant.fp8.fake_quantize_activation``) is applied to the input of each
    GEMM: the FP8-emulated reference of kernels that quantise activations."""
    quantize = input_quant or (lambda t: t)
    h = F.linear(quantize(x_MD.float()), w13_RD.float(), None if b13_R is None else b13_R.float())
    a = expert_activation(h, Activation(activation), alpha=alpha, limit=limit, softcaps=softcaps)
    return F.linear(quantize(a), w2_DF.float(), None if b2_D is None else b2_D.float())


def reference_moe(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    w13_ERD: torch.Tensor,
    w2_EDF: torch.Tensor,
    activation: Activation | str = Activation.SWIGLU,
    b13_ER: torch.Tensor | None = None,
    b2_ED: torch.Tensor | None = None,
    apply_on_input: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    input_quant: Callable[[torch.Tensor], torch.Tensor] | None = None,
    softcaps: tuple[float, float] = (4.0, 25.0),
) -> torch.Tensor:
    """Routed experts only (no router, no shared expert): ``y_TD = sum_k w_tk * expert_{id_tk}(x_t)``.

    With ``apply_on_input`` the weight scales the expert's input instead (Llama 4). Returns fp32.
    ``input_quant``, ``softcaps``: see :func:`reference_expert`.
    """
    activation = Activation(activation)
    x32_TD = x_TD.float()
    y_TD = torch.zeros_like(x32_TD)
    for e in range(w13_ERD.shape[0]):
        token_idx, slot = torch.nonzero(ids_TK == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        w_M1 = weights_TK[token_idx, slot].float().unsqueeze(1)
        x_MD = x32_TD[token_idx] * w_M1 if apply_on_input else x32_TD[token_idx]
        y_MD = reference_expert(
            x_MD, w13_ERD[e], w2_EDF[e], activation,
            None if b13_ER is None else b13_ER[e], None if b2_ED is None else b2_ED[e], alpha, limit, input_quant,
            softcaps,
        )
        y_TD.index_add_(0, token_idx, y_MD if apply_on_input else y_MD * w_M1)
    return y_TD


def reference_moe_layer(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The whole ``moe.MoE`` layer in reference math, using the layer's own router and weights (``layer`` is
    typed Any: this oracle sits below ``moe.layer``)."""
    x_TD = x.reshape(-1, x.shape[-1])
    routing = layer.router(x_TD)
    ex = layer.experts
    cfg = layer.config
    y_TD = reference_moe(
        x_TD, routing.weights_TK, routing.ids_TK, ex.w13_E2FD, ex.w2_EDF, cfg.activation,
        ex.b13_E2F, ex.b2_ED, routing.apply_on_input, cfg.swiglu_alpha, cfg.swiglu_limit,
        softcaps=(cfg.swiglu_gate_softcap, cfg.swiglu_up_softcap),
    )
    if layer.shared_expert is not None:
        y_TD = y_TD + layer.shared_expert(x_TD.float()).float()
    return y_TD.reshape(x.shape).to(x.dtype)
