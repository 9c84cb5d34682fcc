"""Reading ``transformers`` (5.x) MoE blocks: ``moe_from_hf(block, layer_cls)`` behind ``moe.MoE.from_hf``.

Expert weights are shared (the same ``nn.Parameter``) where the layouts agree: transformers 5 keeps
``gate_up_proj`` as ``[E, 2F, D]`` (gate rows then up rows) and ``down_proj`` as ``[E, D, F]``, exactly our
``w13_E2FD`` / ``w2_EDF``. Transposed or interleaved layouts (gpt-oss, Llama 4) and the dense shared experts
are copied once into our fused layout. The layer class comes in as an argument: this module sits below
``moe.layer`` (whose ``MoE.from_hf`` calls it); ``moe.patch`` replaces the blocks of whole models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from moe.config import Activation, MoEConfig
from routing.config import GroupScore, RouterConfig, Scoring

# Families whose block is ``gate`` (softmax top-k router) + ``experts`` (+ optional Qwen-style gated shared expert).
_SOFTMAX_BLOCKS = {
    "MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock", "FlexOlmoSparseMoeBlock",
    "MiniMaxSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3NextSparseMoeBlock", "Qwen3_5MoeSparseMoeBlock",
}
# DeepSeek-V3-style blocks: sigmoid router with correction bias and grouped top-k, plus ``shared_experts``.
_DEEPSEEK_V3_BLOCKS = {"DeepseekV3MoE", "Glm4MoeMoE", "Dots1MoE", "ExaoneMoeMoE"}


Layer = TypeVar("Layer", bound=nn.Module)  # moe.MoE (passed in by MoE.from_hf)
# A transformers module (block, experts, gate, MLP): typed Any, its attributes differ from family to family. The
# layers built here are typed Any for the same reason from below moe.layer: they are layer_cls(config).
Block = Any
Builder = Callable[[Block, Callable[[MoEConfig], Any]], Any]


def moe_from_hf(block: Block, layer_cls: type[Layer]) -> Layer:
    """A ``layer_cls`` (``moe.MoE``) computing exactly what the ``transformers`` block computes (see
    ``supported_blocks()``)."""
    builder = _BUILDERS.get(type(block).__name__)
    if builder is None:
        raise ValueError(
            f"unsupported MoE block class {type(block).__name__!r}; supported: {', '.join(supported_blocks())}"
        )
    layer = builder(block, layer_cls)
    left_on_meta = [name for name, t in layer.state_dict().items() if t.is_meta]
    if left_on_meta:  # a builder forgot to take over a tensor from the block
        raise RuntimeError(f"{type(block).__name__}: tensors not taken from the block: {left_on_meta}")
    return layer


def supported_blocks() -> list[str]:
    return sorted(_BUILDERS)


def is_supported(block: Block) -> bool:
    return type(block).__name__ in _BUILDERS


def _activation(experts: Block) -> Activation:
    """The gated activation of a HF experts module, from its ``act_fn``."""
    act_fn = experts.act_fn
    if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return Activation.SWIGLU
    if type(act_fn) is nn.GELU or type(act_fn).__name__ == "GELUActivation":
        return Activation.GEGLU
    raise ValueError(f"unsupported expert activation {type(act_fn).__name__!r} in {type(experts).__name__}")


def _standard_experts(experts: Block) -> tuple[nn.Parameter, nn.Parameter]:
    """``gate_up_proj [E, 2F, D]`` and ``down_proj [E, D, F]`` of a transformers-5 fused experts module."""
    layout = (getattr(experts, "is_transposed", False), getattr(experts, "is_concatenated", True),
              getattr(experts, "has_bias", False), getattr(experts, "has_gate", True))
    if layout != (False, True, False, True):
        raise ValueError(f"unsupported expert layout in {type(experts).__name__}: transposed/concat/bias/gate={layout}")
    return experts.gate_up_proj, experts.down_proj


def _build(layer_cls: Callable[[MoEConfig], Any], config: MoEConfig, w13: nn.Parameter, w2: nn.Parameter,
           router_weight: nn.Parameter) -> Any:
    """A ``layer_cls`` whose routed-expert and router parameters *are* the given ones (no copy)."""
    with torch.device("meta"):
        layer = layer_cls(config)  # parameters created on meta, then replaced: no allocation, no init cost
    layer.experts.w13_E2FD = w13
    layer.experts.w2_EDF = w2
    layer.router.weight = router_weight
    return layer


def _set_shared(layer: Any, mlp: Block, gate: Block | None = None) -> None:
    """Copy a HF dense MLP (``gate_proj``/``up_proj``/``down_proj``) into the layer's fused shared expert."""
    shared = layer.shared_expert
    with torch.no_grad():
        shared.w13_XD = nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).detach().clone())
        shared.w2_DS = nn.Parameter(mlp.down_proj.weight.detach().clone())
        if gate is not None:
            shared.gate_weight = gate.weight


def _softmax_block(block: Block, layer_cls: Callable[[MoEConfig], Any]) -> Any:
    gate, experts = block.gate, block.experts
    w13, w2 = _standard_experts(experts)
    E, X, D = w13.shape
    shared = getattr(block, "shared_expert", None)
    router = RouterConfig(E, gate.top_k, Scoring.SOFTMAX, renormalize=getattr(gate, "norm_topk_prob", True))
    config = MoEConfig(
        D, X // 2, E, gate.top_k, _activation(experts), router,
        shared_ffn_size=0 if shared is None else shared.down_proj.weight.shape[1],
        shared_expert_gate=getattr(block, "shared_expert_gate", None) is not None,
        extra={"hf_class": type(block).__name__},
    )
    layer = _build(layer_cls, config, w13, w2, gate.weight)
    if shared is not None:
        _set_shared(layer, shared, getattr(block, "shared_expert_gate", None))
    return layer


def _deepseek_v3_block(block: Block, layer_cls: Callable[[MoEConfig], Any]) -> Any:
    gate, experts = block.gate, block.experts
    w13, w2 = _standard_experts(experts)
    E, X, D = w13.shape
    router = RouterConfig(
        E, gate.top_k, Scoring.SIGMOID, renormalize=gate.norm_topk_prob, correction_bias=True,
        num_groups=gate.num_group, topk_groups=gate.topk_group, group_score=GroupScore.TOP2_SUM,
        routed_scaling_factor=gate.routed_scaling_factor,
    )
    shared = block.shared_experts
    config = MoEConfig(D, X // 2, E, gate.top_k, _activation(experts), router,
                       shared_ffn_size=shared.down_proj.weight.shape[1], extra={"hf_class": type(block).__name__})
    layer = _build(layer_cls, config, w13, w2, gate.weight)
    layer.router.correction_bias = gate.e_score_correction_bias
    _set_shared(layer, shared)
    return layer


def _deepseek_v2_block(block: Block, layer_cls: Callable[[MoEConfig], Any]) -> Any:
    gate, experts = block.gate, block.experts
    w13, w2 = _standard_experts(experts)
    E, X, D = w13.shape
    grouped = gate.topk_method == "group_limited_greedy"
    router = RouterConfig(
        E, gate.top_k, Scoring.SOFTMAX, renormalize=False, num_groups=gate.num_group if grouped else 1,
        topk_groups=gate.topk_group if grouped else 1, group_score=GroupScore.MAX,
        routed_scaling_factor=gate.routed_scaling_factor,
    )
    shared = block.shared_experts
    config = MoEConfig(D, X // 2, E, gate.top_k, _activation(experts), router,
                       shared_ffn_size=shared.down_proj.weight.shape[1], extra={"hf_class": type(block).__name__})
    layer = _build(layer_cls, config, w13, w2, gate.weight)
    _set_shared(layer, shared)
    return layer


def _gpt_oss_block(block: Block, layer_cls: Callable[[MoEConfig], Any]) -> Any:
    """gpt-oss: ``[in, out]`` experts with gate/up *interleaved* and biases; top-k on logits then softmax."""
    router, experts = block.router, block.experts
    E, D, X = experts.gate_up_proj.shape
    config = MoEConfig(
        D, X // 2, E, router.top_k, Activation.SWIGLU_OAI,
        RouterConfig(E, router.top_k, Scoring.SOFTMAX_TOPK, bias=True), expert_bias=True,
        swiglu_alpha=experts.alpha, swiglu_limit=experts.limit, extra={"hf_class": type(block).__name__},
    )
    deinterleave = lambda t: torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)  # noqa: E731
    with torch.no_grad():
        w13 = nn.Parameter(deinterleave(experts.gate_up_proj).transpose(1, 2).contiguous())
        w2 = nn.Parameter(experts.down_proj.transpose(1, 2).contiguous())
        layer = _build(layer_cls, config, w13, w2, router.weight)
        layer.router.bias = router.bias
        layer.experts.b13_E2F = nn.Parameter(deinterleave(experts.gate_up_proj_bias).detach().clone())
        layer.experts.b2_ED = experts.down_proj_bias
    return layer


def _llama4_block(block: Block, layer_cls: Callable[[MoEConfig], Any]) -> Any:
    """Llama 4: ``[in, out]`` experts (gate columns then up), sigmoid top-k scaling the expert *input*."""
    router, experts = block.router, block.experts
    E, D, X = experts.gate_up_proj.shape
    config = MoEConfig(
        D, X // 2, E, router.top_k, _activation(experts),
        RouterConfig(E, router.top_k, Scoring.SIGMOID, renormalize=False, apply_on_input=True),
        shared_ffn_size=block.shared_expert.down_proj.weight.shape[1], extra={"hf_class": type(block).__name__},
    )
    with torch.no_grad():
        w13 = nn.Parameter(experts.gate_up_proj.transpose(1, 2).contiguous())
        w2 = nn.Parameter(experts.down_proj.transpose(1, 2).contiguous())
    layer = _build(layer_cls, config, w13, w2, router.weight)
    _set_shared(layer, block.shared_expert)
    return layer


_BUILDERS: dict[str, Builder] = {
    **{name: _softmax_block for name in _SOFTMAX_BLOCKS},
    **{name: _deepseek_v3_block for name in _DEEPSEEK_V3_BLOCKS},
    "DeepseekV2Moe": _deepseek_v2_block,
    "GptOssMLP": _gpt_oss_block,
    "Llama4TextMoe": _llama4_block,
}
