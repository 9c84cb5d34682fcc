"""Reading ``transformers`` (5.x) MoE blocks: ``moe_from_hf(block, layer_cls)`` behind ``moe.MoE.from_hf``.

Expert weights are shared (the same ``nn.Parameter``) where the layouts agree: transformers 5 keeps
``gate_up_proj`` as ``[E, 2F, D]`` (gate rows then up rows) and ``down_proj`` as ``[E, D, F]``, exactly our
``w13_E2FD`` / ``w2_EDF``. Transposed or interleaved layouts (gpt-oss, Llama 4) and the dense shared experts
are copied once into our fused layout. The layer class comes in as an argument: this module sits below
``moe.layer`` (whose ``MoE.from_hf`` calls it); ``moe.patch`` replaces the blocks of whole models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from moe.config import Activation, MoEConfig
from routing.config import GroupScore, RouterConfig, Scoring


@dataclass(frozen=True)
class TopKPattern:
    """The routing of a family whose block is a router (``gate``/``router``) + standard fused ``experts`` (+ a
    shared expert): what the block's attributes do not say. Everything else is read from the block: ``top_k``,
    ``norm_topk_prob`` (else ``renormalize``), a correction bias, ``num_group``/``topk_group``,
    ``routed_scaling_factor``, the shared expert and its gate."""

    scoring: Scoring
    renormalize: bool = True  # when the router has no norm_topk_prob


_SOFTMAX = TopKPattern(Scoring.SOFTMAX)  # softmax over all experts, top-k, renormalised unless norm_topk_prob=False
_SOFTMAX_UNNORMALISED = TopKPattern(Scoring.SOFTMAX, renormalize=False)  # the k softmax scores as they are
_SIGMOID = TopKPattern(Scoring.SIGMOID)  # sigmoid scores (+ selection-only bias, groups, scaling)
_LOGITS_TOPK = TopKPattern(Scoring.SOFTMAX_TOPK)  # top-k of the logits, softmax over the k chosen

# One line per family: a new family reusing a known pattern is a new line here.
_TOPK_BLOCKS: dict[str, TopKPattern] = {
    "MixtralSparseMoeBlock": _SOFTMAX, "Qwen3MoeSparseMoeBlock": _SOFTMAX, "OlmoeSparseMoeBlock": _SOFTMAX,
    "FlexOlmoSparseMoeBlock": _SOFTMAX, "MiniMaxSparseMoeBlock": _SOFTMAX, "Qwen2MoeSparseMoeBlock": _SOFTMAX,
    "Qwen3NextSparseMoeBlock": _SOFTMAX, "Qwen3_5MoeSparseMoeBlock": _SOFTMAX,
    "Qwen3VLMoeTextSparseMoeBlock": _SOFTMAX, "HunYuanMoEV1Moe": _SOFTMAX,
    "Ernie4_5_MoeSparseMoeBlock": _SOFTMAX,  # + a selection-only bias (moe_statics)
    "Mistral4MoE": _SOFTMAX,  # + grouped top-k (top-2 sum of the scores) and scaling
    "JambaSparseMoeBlock": _SOFTMAX_UNNORMALISED,
    "MistralLarge4TextMoE": _SOFTMAX, "LaraMiniSparseMoeBlock": _SOFTMAX, "MellumSparseMoeBlock": _SOFTMAX,
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": _SOFTMAX, "Qwen4ExpTextSparseMoeBlock": _SOFTMAX,
    "DeepseekV3MoE": _SIGMOID, "Glm4MoeMoE": _SIGMOID, "Glm4MoeLiteMoE": _SIGMOID, "Dots1MoE": _SIGMOID,
    "ExaoneMoeSparseMoEBlock": _SIGMOID, "MiniMaxM2SparseMoeBlock": _SIGMOID,
    "MiniMaxM3VLSparseMoeBlock": _SIGMOID, "Lfm2MoeSparseMoeBlock": _SIGMOID, "Glm5NextTextMoE": _SIGMOID,
    "HYV4MoE": _SIGMOID, "HYV4VLMoE": _SIGMOID,
    "DeepseekV32MoE": _SIGMOID, "GlmMoeDsaMoE": _SIGMOID, "Glm4vMoeTextMoE": _SIGMOID, "KimiLinearMoE": _SIGMOID,
    "AXK2MoE": _SIGMOID, "BailingHybridMoE": _SIGMOID, "FlintSparseMoeBlock": _SIGMOID,
    "LagunaSparseMoeBlock": _SIGMOID, "MiMoV2FlashMoE": _SIGMOID, "SolarOpenMoE": _SIGMOID,
    "Step3p7SparseMoeBlock": _SIGMOID, "AfmoeSparseMoeBlock": _SIGMOID,
    "GraniteMoeMoE": _LOGITS_TOPK, "GraniteMoeSharedMoE": _LOGITS_TOPK, "GraniteMoeSWAMoE": _LOGITS_TOPK,
    "GraniteMoeHybridMoE": _LOGITS_TOPK,
}

# Blocks with an ``experts`` child that are not a top-k-routed set of MLPs/GLUs, and why (patch_hf names them).
REFUSED_BLOCKS: dict[str, str] = {
    "PhimoeSparseMoeBlock": "sparsemixer routing (a per-expert masked softmax, not a top-k of one score)",
    "SwitchTransformersSparseMLP": "encoder-decoder top-1 router with expert capacity and token dropping",
    "VitPoseBackboneMoeMLP": "the expert is chosen by the dataset index passed in, not by a router",
    "JetMoeAttention": "attention mixture (the experts are attention projections, JetMoeMoA)",
    "DogeCDMoE": "experts are rows of two embeddings retrieved by product keys, beside a dense MLP",
    "NllbMoeSparseMLP": "encoder-decoder top-2 router with expert capacity and token dropping",
}


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
        raise ValueError(unsupported_reason(block) + f"; supported: {', '.join(supported_blocks())}")
    layer = builder(block, layer_cls)
    left_on_meta = [name for name, t in layer.state_dict().items() if t.is_meta]
    if left_on_meta:  # a builder forgot to take over a tensor from the block
        raise RuntimeError(f"{type(block).__name__}: tensors not taken from the block: {left_on_meta}")
    return layer


def supported_blocks() -> list[str]:
    return sorted(_BUILDERS)


def unsupported_reason(block: Block) -> str:
    """One line naming the block's class, and why it is refused when that is known."""
    cls = type(block).__name__
    reason = REFUSED_BLOCKS.get(cls)
    return f"unsupported MoE block class {cls!r}" + (f" ({reason})" if reason else "")


def is_supported(block: Block) -> bool:
    return type(block).__name__ in _BUILDERS


def looks_like_moe(module: nn.Module) -> bool:
    """An MoE block patch_hf must either replace or refuse: it has an ``experts`` child or is a known refusal."""
    return isinstance(getattr(module, "experts", None), nn.Module) or type(module).__name__ in REFUSED_BLOCKS


def _activation(experts: Block) -> tuple[Activation, dict]:
    """The gated activation of a HF experts (or dense MLP) module and its parameters. Without an ``act_fn``:
    ``swiglu_alpha`` and ``swiglu_limit`` are gpt-oss's clamped GLU on halves (MiniMax-M3), ``swiglu_limit``
    alone a SwiGLU on clamped gate and up (GLM-5-Next, HY-V4); an ``act_fn`` with a ``swiglu_limit`` is the
    latter too (GLM-5-Next's shared MLP)."""
    act_fn = getattr(experts, "act_fn", None)
    limit, alpha = getattr(experts, "swiglu_limit", None), getattr(experts, "swiglu_alpha", None)
    if act_fn is None and alpha is not None and limit is not None:
        return Activation.SWIGLU_OAI, {"swiglu_alpha": float(alpha), "swiglu_limit": float(limit)}
    if (act_fn is None or _act_fn_activation(act_fn, experts) is Activation.SWIGLU) and limit is not None:
        return Activation.SWIGLU_CLAMPED, {"swiglu_limit": float(limit)}
    if act_fn is None:
        raise ValueError(f"unsupported expert activation in {type(experts).__name__}: no act_fn, and no "
                         "swiglu_limit of a clamped GLU")
    return _act_fn_activation(act_fn, experts), {}


def _shared_activation(shared: Block | None, routed: Activation, routed_params: dict) -> Activation | None:
    """The shared MLP's activation where it differs from the routed experts' (HY-V4: plain SwiGLU beside clamped
    experts); its clamp, if any, must be theirs (one ``swiglu_limit`` per layer)."""
    if shared is None:
        return None
    activation, params = _activation(shared)
    if params and params != routed_params:
        raise ValueError(f"unsupported shared expert in {type(shared).__name__}: its activation parameters "
                         f"({params}) differ from the routed experts' ({routed_params})")
    return None if activation is routed else activation


def _act_fn_activation(act_fn, experts: Block) -> Activation:
    if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation" or act_fn is F.silu:
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
    """Copy a HF dense MLP (``gate_proj``/``up_proj``/``down_proj``, or a fused ``gate_up_proj`` whose output
    halves are gate then up) into the layer's fused shared expert."""
    shared = layer.shared_expert
    fused = getattr(mlp, "gate_up_proj", None)
    with torch.no_grad():
        w13 = fused.weight if fused is not None else torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        shared.w13_XD = nn.Parameter(w13.detach().clone())
        shared.w2_DS = nn.Parameter(mlp.down_proj.weight.detach().clone())
        if gate is not None:
            shared.gate_weight = gate.weight


def _router(block: Block) -> tuple[Block, nn.Parameter]:
    """The block's router module and its ``[E, D]`` weight (HunYuan keeps it in ``gate.wg``, AFMoE in
    ``router.gate``)."""
    router = getattr(block, "gate", None) or block.router
    linear = getattr(router, "wg", None) or getattr(router, "gate", None)
    return router, (router.weight if linear is None else linear.weight)


def _correction_bias(block: Block, router: Block) -> torch.Tensor | None:
    """The selection-only expert bias, wherever the family keeps it, as an ``[E]`` view of it."""
    statics = getattr(router, "moe_statics", None)  # Ernie 4.5
    for holder, name in ((router, "e_score_correction_bias"), (block, "e_score_correction_bias"),
                         (statics, "e_score_correction_bias"), (block, "expert_bias")):
        bias = getattr(holder, name, None) if holder is not None else None
        if isinstance(bias, torch.Tensor):  # LFM2 without use_expert_bias has no expert_bias at all
            return bias.detach().reshape(-1)
    return None


def _scaling(block: Block, router: Block) -> float:
    """The routed output's scale: the router's ``routed_scaling_factor`` / ``route_scale``, else the block's (the
    block multiplies the experts' sum, which is the same as scaling each routing weight)."""
    for holder, name in ((router, "routed_scaling_factor"), (router, "route_scale"), (block, "routed_scaling_factor")):
        value = getattr(holder, name, None)
        if value is not None:
            return float(value)
    return 1.0


def _shared_mlp(block: Block) -> Block | None:
    for name in ("shared_expert", "shared_experts", "shared_mlp"):
        if getattr(block, name, None) is not None:
            return getattr(block, name)
    return None


def _topk_block(block: Block, layer_cls: Callable[[MoEConfig], Any]) -> Any:
    """A block of a ``_TOPK_BLOCKS`` family, read from what it holds."""
    pattern = _TOPK_BLOCKS[type(block).__name__]
    (router, router_weight), experts = _router(block), block.experts
    w13, w2 = _standard_experts(experts)
    E, X, D = w13.shape
    top_k = getattr(router, "top_k", None) or block.top_k
    bias = _correction_bias(block, router)
    route = RouterConfig(
        E, top_k, pattern.scoring, renormalize=getattr(router, "norm_topk_prob", pattern.renormalize),
        correction_bias=bias is not None, num_groups=getattr(router, "num_group", 1),
        topk_groups=getattr(router, "topk_group", 1), group_score=GroupScore.TOP2_SUM,
        routed_scaling_factor=_scaling(block, router),
    )
    shared, shared_gate = _shared_mlp(block), getattr(block, "shared_expert_gate", None)
    activation, act_params = _activation(experts)
    config = MoEConfig(
        D, X // 2, E, top_k, activation, route,
        shared_ffn_size=0 if shared is None else shared.down_proj.weight.shape[1],
        shared_activation=_shared_activation(shared, activation, act_params),
        shared_expert_gate=shared_gate is not None, extra={"hf_class": type(block).__name__}, **act_params,
    )
    layer = _build(layer_cls, config, w13, w2, router_weight)
    if bias is not None:
        layer.router.correction_bias = bias
    if shared is not None:
        _set_shared(layer, shared, shared_gate)
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
    activation, act_params = _activation(experts)
    config = MoEConfig(D, X // 2, E, gate.top_k, activation, router, shared_ffn_size=shared.down_proj.weight.shape[1],
                       extra={"hf_class": type(block).__name__}, **act_params)
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
        D, X // 2, E, router.top_k, _activation(experts)[0],
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
    **{name: _topk_block for name in _TOPK_BLOCKS},
    "DeepseekV2Moe": _deepseek_v2_block, "DeepseekOcr2TextMoe": _deepseek_v2_block,
    "UnlimitedOcrTextMoe": _deepseek_v2_block,
    "GptOssMLP": _gpt_oss_block,
    "Llama4TextMoe": _llama4_block,
}
