"""Reading ``transformers`` (5.x) MoE blocks: ``moe_from_hf(block, layer_cls)`` behind ``moe.MoE.from_hf``.

Expert weights are shared (the same ``nn.Parameter``) where the layouts agree: transformers 5 keeps
``gate_up_proj`` as ``[E, 2F, D]`` (gate rows then up rows) and ``down_proj`` as ``[E, D, F]``, exactly our
``w13_E2FD`` / ``w2_EDF``. Transposed or interleaved layouts (gpt-oss, Llama 4) and the dense shared experts
are copied once into our fused layout. The layer class comes in as an argument: this module sits below
``moe.layer`` (whose ``MoE.from_hf`` calls it); ``moe.patch`` replaces the blocks of whole models.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
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
    bias_on_logits: bool = False  # the correction bias is added to the logits, not the scores, to select


_SOFTMAX = TopKPattern(Scoring.SOFTMAX)  # softmax over all experts, top-k, renormalised unless norm_topk_prob=False
_SOFTMAX_UNNORMALISED = TopKPattern(Scoring.SOFTMAX, renormalize=False)  # the k softmax scores as they are
_SIGMOID = TopKPattern(Scoring.SIGMOID)  # sigmoid scores (+ selection-only bias, groups, scaling)
_SIGMOID_LOGIT_BIAS = TopKPattern(Scoring.SIGMOID, bias_on_logits=True)  # the bias shifts the logits (Kolibri-1)
_SQRT_SOFTPLUS = TopKPattern(Scoring.SQRT_SOFTPLUS)  # sqrt(softplus) scores, else as _SIGMOID (DeepSeek-V4)
_LOGITS_TOPK = TopKPattern(Scoring.SOFTMAX_TOPK)  # top-k of the logits, softmax over the k chosen


def _score_fn_pattern(block: Block) -> TopKPattern:
    """The pattern of a router that names its score function in ``score_fn`` (DeepSeek-V4, Inkling 2)."""
    score_fn = type(block.gate.score_fn).__name__
    patterns = {"Sigmoid": _SIGMOID, "SigmoidActivation": _SIGMOID, "SqrtSoftplusActivation": _SQRT_SOFTPLUS}
    if score_fn not in patterns:
        raise ValueError(f"unsupported router score function {score_fn!r} in {type(block).__name__}")
    return patterns[score_fn]


def _cohere2_pattern(block: Block) -> TopKPattern:
    """Cohere2-MoE selects on the logits, then takes a softmax over the k chosen or their (renormalised if
    ``norm_topk_prob``) sigmoids: top-k of the logits is top-k of the sigmoids."""
    selection = block.gate.expert_selection_fn
    if selection not in ("softmax", "sigmoid"):
        raise ValueError(f"unsupported expert_selection_fn {selection!r} in {type(block).__name__}")
    return _LOGITS_TOPK if selection == "softmax" else _SIGMOID

# One line per family: a new family reusing a known pattern is a new line here. A function of the block stands
# for a pattern that the block's config chooses.
_TOPK_BLOCKS: dict[str, TopKPattern | Callable[[Any], TopKPattern]] = {
    "MixtralSparseMoeBlock": _SOFTMAX, "Qwen3MoeSparseMoeBlock": _SOFTMAX, "OlmoeSparseMoeBlock": _SOFTMAX,
    "FlexOlmoSparseMoeBlock": _SOFTMAX, "MiniMaxSparseMoeBlock": _SOFTMAX, "Qwen2MoeSparseMoeBlock": _SOFTMAX,
    "Qwen3NextSparseMoeBlock": _SOFTMAX, "Qwen3_5MoeSparseMoeBlock": _SOFTMAX,
    "Qwen3VLMoeTextSparseMoeBlock": _SOFTMAX, "HunYuanMoEV1Moe": _SOFTMAX,
    "Ernie4_5_MoeSparseMoeBlock": _SOFTMAX,  # + a selection-only bias (moe_statics)
    "Mistral4MoE": _SOFTMAX,  # + grouped top-k (top-2 sum of the scores) and scaling
    "JambaSparseMoeBlock": _SOFTMAX_UNNORMALISED,
    "MistralLarge4TextMoE": _SOFTMAX, "LaraMiniSparseMoeBlock": _SOFTMAX, "MellumSparseMoeBlock": _SOFTMAX,
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": _SOFTMAX, "Qwen4ExpTextSparseMoeBlock": _SOFTMAX,
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": _SOFTMAX,
    "AXK1MoE": _SIGMOID,  # DeepSeek-V3's, with an RMSNorm on its output (MoEConfig.output_norm_eps)
    "DeepseekV3MoE": _SIGMOID, "Glm4MoeMoE": _SIGMOID, "Glm4MoeLiteMoE": _SIGMOID, "Dots1MoE": _SIGMOID,
    "ExaoneMoeSparseMoEBlock": _SIGMOID, "MiniMaxM2SparseMoeBlock": _SIGMOID,
    "MiniMaxM3VLSparseMoeBlock": _SIGMOID, "Lfm2MoeSparseMoeBlock": _SIGMOID, "Glm5NextTextMoE": _SIGMOID,
    "HYV4MoE": _SIGMOID, "HYV4VLMoE": _SIGMOID,
    "DeepseekV32MoE": _SIGMOID, "GlmMoeDsaMoE": _SIGMOID, "Glm4vMoeTextMoE": _SIGMOID, "KimiLinearMoE": _SIGMOID,
    "AXK2MoE": _SIGMOID, "BailingHybridMoE": _SIGMOID, "FlintSparseMoeBlock": _SIGMOID,
    "LagunaSparseMoeBlock": _SIGMOID, "MiMoV2FlashMoE": _SIGMOID, "SolarOpenMoE": _SIGMOID,
    "Step3p7SparseMoeBlock": _SIGMOID, "AfmoeSparseMoeBlock": _SIGMOID, "BeamMoE": _SIGMOID,
    "HYV3MoE": _SIGMOID, "Dots3NoteTextMoE": _SIGMOID, "Dots3NoteVisionMoE": _SIGMOID,
    "NemotronHMoE": _SIGMOID,  # non-gated relu^2 experts and shared MLP
    "MiniCPM5MoeMoE": _SIGMOID,  # DeepSeek-V3's, router in fp32
    "Kolibri1SparseMoeBlock": _SIGMOID_LOGIT_BIAS, "Kolibri1_1SparseMoeBlock": _SIGMOID_LOGIT_BIAS,
    "DeepseekV4SparseMoeBlock": _score_fn_pattern,  # its top-k layers (the hash-routed ones are refused)
    "Inkling2SparseMoeBlock": _score_fn_pattern, "Inkling2LoopSparseMoeBlock": _score_fn_pattern,  # softcapped GLU
    "Cohere2MoeSparseMoeBlock": _cohere2_pattern,  # + a shared expert summed or averaged with the routed ones
    "AriaTextMoELayer": _LOGITS_TOPK,  # transposed experts
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
    "LongcatFlashMoE": "zero-computation (identity) experts among the routed ones",
    "ZayaSparseMoeBlock": "an MLP router carrying its state across layers, with a skip (no-compute) expert",
    "InklingMoE": "shared experts weighted by the router, normalised jointly with the chosen routed experts",
    "MuseSparkMoE": "experts in a projected latent space (pre/post projections, norms and a per-expert norm)",
    "Ernie4_5_VLMoeSparseMoeBlock": "text and vision expert groups split by modality in the parent block",
    "Gemma4TextDecoderLayer": "experts on the decoder layer beside a dense MLP, router and experts fed different "
                              "norms of the residual",
    "DiffusionGemmaEncoderTextLayer": "experts on the decoder layer beside a dense MLP, router and experts fed "
                                      "different norms of the residual",
    "DiffusionGemmaDecoderTextLayer": "experts on the decoder layer beside a dense MLP, router and experts fed "
                                      "different norms of the residual",
    "ErgoMoE": "a per-expert RMSNorm on each routed expert's output before the weighted sum (post_expert_norm), "
               "and an RMSNorm on the shared expert's output",
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
    if _instance_refusal(block):
        raise ValueError(unsupported_reason(block))
    layer = builder(block, layer_cls)
    left_on_meta = [name for name, t in layer.state_dict().items() if t.is_meta]
    if left_on_meta:  # a builder forgot to take over a tensor from the block
        raise RuntimeError(f"{type(block).__name__}: tensors not taken from the block: {left_on_meta}")
    return layer


def supported_blocks() -> list[str]:
    """The block classes ``moe_from_hf`` reads that the installed ``transformers`` defines (the table also names
    families of newer releases)."""
    return sorted(set(_BUILDERS) & _installed_transformers_classes())


@functools.cache  # the installed transformers does not change while the process runs
def _installed_transformers_classes() -> frozenset[str]:
    """The top-level class names of the installed ``transformers``' modeling files, read as text: importing every
    model module would take seconds."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    models = pathlib.Path(spec.submodule_search_locations[0]) / "models"
    class_name = re.compile(r"^class (\w+)\b", re.M)
    return frozenset(name for path in models.glob("*/modeling_*.py")
                     for name in class_name.findall(path.read_text(encoding="utf-8")))


def unsupported_reason(block: Block) -> str:
    """One line naming the block's class, and why it is refused when that is known."""
    cls = type(block).__name__
    reason = REFUSED_BLOCKS.get(cls) or _instance_refusal(block)
    return f"unsupported MoE block class {cls!r}" + (f" ({reason})" if reason else "")


def is_supported(block: Block) -> bool:
    return type(block).__name__ in _BUILDERS and not _instance_refusal(block)


def _instance_refusal(block: Block) -> str | None:
    """Why this block of a read family does not fit, where its config made it so (None: it fits)."""
    cls = type(block).__name__
    if cls == "DeepseekV4SparseMoeBlock" and block.is_hash:
        return "hash routing of this layer: experts looked up by token id (tid2eid), not chosen by the router"
    if cls == "NemotronHMoE" and not isinstance(block.fc1_latent_proj, nn.Identity):
        return "experts in a latent space (moe_latent_size): projections around the routed experts only"
    return None


def looks_like_moe(module: nn.Module) -> bool:
    """An MoE block patch_hf must either replace or refuse: it has an ``experts`` child or is a known refusal."""
    return isinstance(getattr(module, "experts", None), nn.Module) or type(module).__name__ in REFUSED_BLOCKS


def _activation(experts: Block) -> tuple[Activation, dict]:
    """The activation of a HF experts (or dense MLP) module and its parameters. Without an ``act_fn``:
    ``swiglu_alpha`` and ``swiglu_limit`` are gpt-oss's clamped GLU on halves (MiniMax-M3), ``swiglu_limit``
    alone a SwiGLU on clamped gate and up (GLM-5-Next, HY-V4); a SiLU ``act_fn`` with a ``swiglu_limit`` (or
    DeepSeek-V4's ``limit``) is the latter too (GLM-5-Next's shared MLP). An ``act_fn`` holding a gate and an up
    softcap is Inkling 2's softcapped SwiGLU."""
    act_fn = getattr(experts, "act_fn", None)
    limit = getattr(experts, "swiglu_limit", None)
    limit = getattr(experts, "limit", None) if limit is None else limit
    alpha = getattr(experts, "swiglu_alpha", None)
    if act_fn is not None and hasattr(act_fn, "gate_softcap") and hasattr(act_fn, "up_softcap"):
        return Activation.SWIGLU_SOFTCAPPED, {"swiglu_gate_softcap": float(act_fn.gate_softcap.softcap),
                                              "swiglu_up_softcap": float(act_fn.up_softcap.softcap)}
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
    if type(act_fn).__name__ == "ReLUSquaredActivation":  # relu(x) ** 2, of non-gated experts (Nemotron-H)
        return Activation.RELU2
    raise ValueError(f"unsupported expert activation {type(act_fn).__name__!r} in {type(experts).__name__}")


def _standard_experts(experts: Block) -> tuple[nn.Parameter, nn.Parameter]:
    """``gate_up_proj [E, 2F, D]`` and ``down_proj [E, D, F]`` of a transformers-5 fused experts module."""
    layout = (getattr(experts, "is_transposed", False), getattr(experts, "is_concatenated", True),
              getattr(experts, "has_bias", False), getattr(experts, "has_gate", True))
    if layout != (False, True, False, True):
        raise ValueError(f"unsupported expert layout in {type(experts).__name__}: transposed/concat/bias/gate={layout}")
    return experts.gate_up_proj, experts.down_proj


def _expert_weights(experts: Block) -> tuple[nn.Parameter, nn.Parameter]:
    """Our ``w13 [E, X, D]`` and ``w2 [E, D, F]`` of a transformers-5 fused experts module: its own tensors in
    the standard layout; ``up_proj`` as ``w13`` (``X = F``) for non-gated experts (Nemotron-H); a copy of the
    transposed ``[in, out]`` layout (gate columns then up, Aria)."""
    if not getattr(experts, "has_gate", True) and not getattr(experts, "is_transposed", False) \
            and not getattr(experts, "has_bias", False):
        return experts.up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False) and getattr(experts, "is_concatenated", True) \
            and not getattr(experts, "has_bias", False) and getattr(experts, "has_gate", True):
        with torch.no_grad():
            return (nn.Parameter(experts.gate_up_proj.transpose(1, 2).contiguous()),
                    nn.Parameter(experts.down_proj.transpose(1, 2).contiguous()))
    return _standard_experts(experts)


def _build(layer_cls: Callable[[MoEConfig], Any], config: MoEConfig, w13: nn.Parameter, w2: nn.Parameter,
           router_weight: nn.Parameter) -> Any:
    """A ``layer_cls`` whose routed-expert and router parameters *are* the given ones (no copy)."""
    with torch.device("meta"):
        layer = layer_cls(config)  # parameters created on meta, then replaced: no allocation, no init cost
    layer.experts.w13_E2FD = w13
    layer.experts.w2_EDF = w2
    layer.router.weight = router_weight
    return layer


def _set_shared(layer: Any, mlp: Block, gate: Block | None = None, scale: float = 1.0) -> None:
    """Copy a HF dense MLP (``gate_proj``/``up_proj``/``down_proj``, a fused ``gate_up_proj`` whose output
    halves are gate then up, or a non-gated ``up_proj``/``down_proj``) into the layer's fused shared expert;
    ``scale`` multiplies its output (folded into the copied ``down_proj``)."""
    shared = layer.shared_expert
    fused = getattr(mlp, "gate_up_proj", None)
    linears = [m for m in (fused, getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None), mlp.down_proj) if m]
    if any(getattr(m, "bias", None) is not None for m in linears):
        raise ValueError(f"unsupported shared expert in {type(mlp).__name__}: its projections have biases")
    with torch.no_grad():
        if fused is not None:
            w13 = fused.weight
        elif getattr(mlp, "gate_proj", None) is None:  # non-gated
            w13 = mlp.up_proj.weight
        else:
            w13 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        shared.w13_XD = nn.Parameter(w13.detach().clone())
        shared.w2_DS = nn.Parameter(mlp.down_proj.weight.detach() * scale)
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
    for holder, name in ((router, "routed_scaling_factor"), (router, "route_scale"), (router, "router_scaling_factor"),
                         (block, "routed_scaling_factor")):
        value = getattr(holder, name, None)
        if value is not None:
            return float(value)
    return 1.0


def _shared_mlp(block: Block) -> Block | None:
    for name in ("shared_expert", "shared_experts", "shared_mlp"):
        if getattr(block, name, None) is not None:
            return getattr(block, name)
    return None


def _shared_scale(block: Block) -> float:
    """What the block multiplies the sum of its routed and shared outputs by: Cohere2-MoE can average them."""
    combination = getattr(block, "shared_expert_combination_strategy", "sum")
    if combination not in ("sum", "average"):
        raise ValueError(f"unsupported shared_expert_combination_strategy {combination!r} in {type(block).__name__}")
    return 0.5 if combination == "average" and _shared_mlp(block) is not None else 1.0


def _topk_block(block: Block, layer_cls: Callable[[MoEConfig], Any]) -> Any:
    """A block of a ``_TOPK_BLOCKS`` family, read from what it holds."""
    pattern = _TOPK_BLOCKS[type(block).__name__]
    pattern = pattern if isinstance(pattern, TopKPattern) else pattern(block)
    (router, router_weight), experts = _router(block), block.experts
    w13, w2 = _expert_weights(experts)
    E, D, F = w2.shape
    top_k = getattr(router, "top_k", None) or block.top_k
    bias = _correction_bias(block, router)
    combine_scale = _shared_scale(block)  # exact: halving routing weights and the shared down_proj
    route = RouterConfig(
        E, top_k, pattern.scoring, renormalize=getattr(router, "norm_topk_prob", pattern.renormalize),
        correction_bias=bias is not None, num_groups=getattr(router, "num_group", 1),
        topk_groups=getattr(router, "topk_group", 1), group_score=GroupScore.TOP2_SUM,
        routed_scaling_factor=_scaling(block, router) * combine_scale,
        bias_on_logits=pattern.bias_on_logits,
    )
    shared, shared_gate = _shared_mlp(block), getattr(block, "shared_expert_gate", None)
    activation, act_params = _activation(experts)
    if activation.gated != getattr(experts, "has_gate", True):
        raise ValueError(f"unsupported experts {type(experts).__name__}: activation {activation.value!r} with "
                         f"has_gate={getattr(experts, 'has_gate', True)}")
    output_norm = getattr(block, "post_mlp_layernorm", None)  # A.X-K1: an RMSNorm on the block's output
    config = MoEConfig(
        D, F, E, top_k, activation, route,
        shared_ffn_size=0 if shared is None else shared.down_proj.weight.shape[1],
        shared_activation=_shared_activation(shared, activation, act_params),
        shared_expert_gate=shared_gate is not None, extra={"hf_class": type(block).__name__}, **act_params,
        output_norm_eps=None if output_norm is None else output_norm.variance_epsilon,
    )
    layer = _build(layer_cls, config, w13, w2, router_weight)
    if output_norm is not None:
        layer.output_norm = output_norm.weight
    if bias is not None:
        layer.router.correction_bias = bias
    if shared is not None:
        _set_shared(layer, shared, shared_gate, combine_scale)
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


def _dbrx_block(block: Block, layer_cls: Callable[[MoEConfig], Any]) -> Any:
    """DBRX: softmax top-k, the k weights divided by their ``moe_normalize_expert_weights``-norm (1: their sum,
    None: as they are); experts as separate ``w1``/``v1``/``w2`` ``[E*F, D]`` tensors (gate, up, down^T)."""
    glu, top_k, p = block.experts.mlp, block.top_k, block.moe_normalize_expert_weights
    if p not in (None, 1, 1.0):
        raise ValueError(f"unsupported moe_normalize_expert_weights ({p}) in {type(block).__name__}: 1 or None")
    E, F, D = glu.moe_num_experts, glu.ffn_hidden_size, glu.hidden_size
    activation, act_params = _activation(SimpleNamespace(act_fn=glu.activation_fn))
    config = MoEConfig(D, F, E, top_k, activation, RouterConfig(E, top_k, Scoring.SOFTMAX, renormalize=p is not None),
                       extra={"hf_class": type(block).__name__}, **act_params)
    with torch.no_grad():
        w13 = nn.Parameter(torch.cat([glu.w1.view(E, F, D), glu.v1.view(E, F, D)], dim=1))
        w2 = nn.Parameter(glu.w2.view(E, F, D).transpose(1, 2).contiguous())
    return _build(layer_cls, config, w13, w2, block.router.layer.weight)


def _gpt_oss_block(block: Block, layer_cls: Callable[[MoEConfig], Any], interleaved: bool = True) -> Any:
    """gpt-oss: ``[in, out]`` experts with gate/up *interleaved* and biases; top-k on logits then softmax.
    ``interleaved=False``: gate columns then up (OpenAI's privacy filter, whose router divides the weights by k and
    whose block multiplies its output by k again: the same weights)."""
    router, experts = block.router, block.experts
    E, D, X = experts.gate_up_proj.shape
    config = MoEConfig(
        D, X // 2, E, router.top_k, Activation.SWIGLU_OAI,
        RouterConfig(E, router.top_k, Scoring.SOFTMAX_TOPK, bias=True), expert_bias=True,
        swiglu_alpha=experts.alpha, swiglu_limit=experts.limit, extra={"hf_class": type(block).__name__},
    )
    deinterleave = (lambda t: torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)) if interleaved else (lambda t: t)
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
    "DbrxFFN": _dbrx_block,
    "GptOssMLP": _gpt_oss_block,
    "OpenAIPrivacyFilterMLP": lambda block, layer_cls: _gpt_oss_block(block, layer_cls, interleaved=False),
    "Llama4TextMoe": _llama4_block,
}
