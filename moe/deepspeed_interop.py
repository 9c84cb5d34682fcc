"""``moe_from_deepspeed``: our layer from a ``deepspeed.moe.layer.MoE`` with Linear-activation-Linear experts.

DeepSpeed keeps one ``nn.Module`` per expert and a ``TopKGate`` (``wg``, fp32 softmax). Its routing weights:
top-1 keeps the raw probability, top-k (k >= 2) renormalises over the chosen experts. Expert weights are
stacked (copied once) into our fused ``[E, F, D]`` / ``[E, D, F]`` layout; the router weight is shared.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from moe.config import Activation, MoEConfig
from routing.config import RouterConfig, Scoring

Layer = TypeVar("Layer", bound=nn.Module)
DeepSpeedModule = Any  # deepspeed.moe's modules (typed Any: deepspeed is optional and untyped)


def moe_from_deepspeed(ds_moe: DeepSpeedModule, layer_cls: type[Layer]) -> Layer:
    """A ``layer_cls`` (``moe.MoE``, which passes itself in ``MoE.from_deepspeed``: this module sits below
    ``moe.layer``) computing what ``ds_moe`` computes."""
    inner = ds_moe.deepspeed_moe
    gate = inner.gate
    experts = list(inner.experts.deepspeed_experts)
    _check_supported(ds_moe, gate, len(experts))
    linears, activation = zip(*[_linear_act_linear(e) for e in experts], strict=True)
    fc1s, fc2s = zip(*linears, strict=True)
    E, k = len(experts), gate.k
    D, F = fc1s[0].in_features, fc1s[0].out_features
    has_bias = fc1s[0].bias is not None or fc2s[0].bias is not None
    config = MoEConfig(
        D, F, E, k, activation[0], RouterConfig(E, k, Scoring.SOFTMAX, renormalize=k >= 2),
        expert_bias=has_bias, extra={"from": "deepspeed.moe.layer.MoE"},
    )
    layer: Any = layer_cls(config).to(gate.wg.weight.device)  # the layer class, typed from below it
    with torch.no_grad():
        layer.router.weight = gate.wg.weight
        layer.experts.w13_E2FD.copy_(torch.stack([fc.weight for fc in fc1s]))
        layer.experts.w2_EDF.copy_(torch.stack([fc.weight for fc in fc2s]))
        if has_bias:
            layer.experts.b13_E2F.copy_(torch.stack([_bias(fc) for fc in fc1s]))
            layer.experts.b2_ED.copy_(torch.stack([_bias(fc) for fc in fc2s]))
    return layer


def _check_supported(ds_moe: DeepSpeedModule, gate: DeepSpeedModule, num_local: int) -> None:
    if getattr(ds_moe, "ep_size", 1) != 1:
        raise ValueError(f"ep_size ({ds_moe.ep_size}) must be 1: convert the full layer, then use "
                         "expert_parallel.shard_moe")
    if getattr(ds_moe, "use_residual", False):
        raise ValueError("use_residual (True): residual (PR-MoE) layers are not supported")
    if gate.drop_tokens:
        raise ValueError("drop_tokens (True): DeepSpeed drops tokens over capacity; our layer is dropless, so "
                         "build the DeepSpeed layer with drop_tokens=False to compare")
    if gate.k == 2 and gate.top2_2nd_expert_sampling:
        raise ValueError("top2_2nd_expert_sampling (True) picks the 2nd expert at random; set it False")
    if num_local < 1:
        raise ValueError(f"num_experts ({num_local}) must be >= 1")


def _linear_act_linear(expert: DeepSpeedModule) -> tuple[tuple[nn.Linear, nn.Linear], Activation]:
    """The two ``nn.Linear`` and the activation of a Linear-activation-Linear expert, in call order."""
    children = list(expert.children())
    linears = [m for m in children if isinstance(m, nn.Linear)]
    acts = [m for m in children if not isinstance(m, nn.Linear)]
    shape_ok = len(linears) == 2 and len(acts) == 1 and linears[0].out_features == linears[1].in_features
    if not shape_ok or linears[0].in_features != linears[1].out_features:
        raise ValueError(f"expert {type(expert).__name__} is not a Linear-activation-Linear MLP: {children}")
    act = acts[0]
    if type(act) is nn.GELU and act.approximate == "none":
        return (linears[0], linears[1]), Activation.GELU
    if type(act) is nn.ReLU:
        return (linears[0], linears[1]), Activation.RELU
    raise ValueError(f"unsupported expert activation {act!r} (supported: nn.GELU(), nn.ReLU())")


def _bias(fc: nn.Linear) -> torch.Tensor:
    return fc.bias if fc.bias is not None else torch.zeros(fc.out_features, device=fc.weight.device)
