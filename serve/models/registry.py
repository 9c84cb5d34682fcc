"""The Hugging Face architectures we serve: how each ``config.json`` maps to a :class:`DecoderConfig`, and the
on-disk names of its MoE block's tensors.

The first families are "Llama attention + an MoE feed-forward"; they differ in config field names, q/k norms,
attention biases, partial rotary, attention windows (sliding, chunked), the router (softmax, or GLM-4.5's and
MiniMax-M2's sigmoid with a correction bias), shared experts and where the MoE block's tensors live; gpt-oss adds
attention sinks, biased experts with a clamped SwiGLU and MXFP4 weights, Llama 4 NoPE layers, L2 q/k norms and a
router scaling the expert input. The
DeepSeek-V3 ones (DeepSeek-V3/R1/V3.1, Kimi K2, GLM-4.7-Flash, Mistral 4) have multi-head latent attention, a
sigmoid (or softmax) group-limited router with DeepSeek's correction bias, shared experts and leading dense layers;
DeepSeek-V3.2 and GLM-5 add DeepSeek Sparse Attention's lightning indexer (``MLAConfig.indexer``), whose fields
other architectures' configs are refused for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from moe.config import Activation
from routing.config import Scoring
from serve.models.config import AttentionWindow, DecoderConfig, IndexerConfig, MLAConfig, QKNorm, RopeScaling, YarnRope
from serve.models.mla import deepseek_softmax_scale

_MISSING = object()


@dataclass(frozen=True)
class Family:
    """One HF architecture: ``parse(config_json) -> DecoderConfig`` and its checkpoint key names.

    ``moe_prefixes``: where a layer's MoE block lives, relative to ``model.layers.{i}.`` (``transformers``
    5 saves Mixtral's under the legacy ``block_sparse_moe``; a raw fused dump uses ``mlp``).
    ``expert_names``: the per-expert (gate, up, down) projection names; ``shared_prefix``: the shared expert's
    name inside the MoE block; ``correction_bias_name``: the router's selection bias inside it.
    ``expert_layout``: ``"gated"`` (gate rows then up rows, per expert or fused), ``"gpt_oss"`` (a ``router``
    with a bias; fused ``[E, in, out]`` experts with gate/up interleaved and biases, or MXFP4) or ``"llama4"`` (a
    ``router``; fused ``[E, in, out]`` experts, gate columns then up). ``dense_prefix``: a dense layer's MLP.
    ``text_model``: ``(key prefix, ignored key prefixes)`` of a multimodal checkpoint whose text model is served
    (its config is ``config.json``'s ``text_config``); None: a text checkpoint.
    """

    parse: Callable[[dict], DecoderConfig]
    moe_prefixes: tuple[str, ...]
    expert_names: tuple[str, str, str]
    shared_prefix: str = "shared_expert"
    correction_bias_name: str = "gate.e_score_correction_bias"
    expert_layout: str = "gated"
    dense_prefix: str = "mlp"
    text_model: tuple[str, tuple[str, ...]] | None = None


def _get(hf: dict, *keys: str, default: Any = _MISSING) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    if default is _MISSING:
        raise ValueError(f"config.json has no {' or '.join(keys)}")
    return default


def _rope(hf: dict, default_theta: float) -> dict:
    """``rope_theta``, ``yarn`` and ``rope_scaling`` (linear, llama3) of a Llama-attention family's
    ``rope_parameters`` / ``rope_scaling``, as ``transformers``' ``ROPE_INIT_FUNCTIONS`` read them."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", default_theta)))
    if kind == "default":
        return dict(rope_theta=theta)
    if kind == "yarn":
        return dict(rope_theta=theta, yarn=_yarn(hf, rope))
    if kind in ("linear", "llama3"):
        return dict(rope_theta=theta, rope_scaling=_rope_scaling(kind, rope))
    raise ValueError(f"rope_parameters.rope_type ({kind!r}) is not supported; supported: default, linear, llama3, "
                     "yarn")


def _rope_scaling(kind: str, rope: dict) -> RopeScaling:
    original = int(rope.get("original_max_position_embeddings") or 8192)
    return RopeScaling(kind, float(_get(rope, "factor")), float(rope.get("low_freq_factor", 1.0)),
                       float(rope.get("high_freq_factor", 4.0)), original)


def _yarn(hf: dict, rope: dict) -> YarnRope:
    max_pos = _get(hf, "max_position_embeddings")
    original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
    factor = rope.get("factor") or max_pos / original
    return YarnRope(float(factor), int(original), float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1),
                    rope.get("mscale"), rope.get("mscale_all_dim"), rope.get("attention_factor"),
                    bool(rope.get("truncate", True)))


_WINDOW_KINDS = ("full_attention", "sliding_attention", "chunked_attention")


def _attention_windows(hf: dict, windows: str) -> tuple[AttentionWindow, ...]:
    """Each layer's window, as the family's ``transformers`` model applies them. ``windows``: ``"none"`` (the
    model ignores ``sliding_window``: GLM-4.5, MiniMax-M2, OLMoE), ``"all"`` (every layer slides by
    ``sliding_window`` when set and ``use_sliding_window`` is not false: Mixtral, Qwen3-MoE), ``"layer_types"``
    (``layer_types`` says, per layer: Qwen2-MoE, gpt-oss; ``chunked_attention`` is Llama 4's
    ``attention_chunk_size``)."""
    layers = _get(hf, "num_hidden_layers")
    sliding = int(hf.get("sliding_window") or 0) if hf.get("use_sliding_window", True) else 0
    if windows == "none" or (windows == "all" and not sliding):
        return (AttentionWindow(),) * layers
    if windows == "all":
        return (AttentionWindow(sliding=sliding),) * layers
    types = hf.get("layer_types") or ["full_attention"] * layers
    if len(types) != layers or set(types) - set(_WINDOW_KINDS):
        raise ValueError(f"layer_types ({types!r}) must list one of {', '.join(_WINDOW_KINDS)} for each of {layers} "
                         "layers")
    if "sliding_attention" in types and not sliding:
        raise ValueError(f"layer_types has sliding_attention layers but sliding_window is {hf.get('sliding_window')!r}")
    chunk = int(hf.get("attention_chunk_size") or 0)
    if "chunked_attention" in types and not chunk:
        raise ValueError("layer_types has chunked_attention layers but attention_chunk_size is "
                         f"{hf.get('attention_chunk_size')!r}")
    kinds = {"full_attention": AttentionWindow(), "sliding_attention": AttentionWindow(sliding=sliding),
             "chunked_attention": AttentionWindow(chunk=chunk)}
    return tuple(kinds[t] for t in types)


def _common(hf: dict, eps: float, theta: float, windows: str = "none") -> dict:
    heads = _get(hf, "num_attention_heads")
    max_pos = _get(hf, "max_position_embeddings")
    eos = hf.get("eos_token_id")
    return dict(
        architecture=hf["architectures"][0],
        vocab_size=_get(hf, "vocab_size"),
        hidden_size=_get(hf, "hidden_size"),
        num_layers=_get(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_get(hf, "num_key_value_heads", default=heads),
        head_dim=_get(hf, "head_dim", default=_get(hf, "hidden_size") // heads),
        max_position_embeddings=max_pos,
        rms_norm_eps=float(_get(hf, "rms_norm_eps", default=eps)),
        **_rope(hf, theta),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        bos_token_id=hf.get("bos_token_id"),
        attention_windows=_attention_windows(hf, windows),
    )


def _check_act(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act ({act!r}) is not supported; only 'silu' (SwiGLU experts) is")


def _qwen_dense_layers(hf: dict) -> tuple[int, ...]:
    step = _get(hf, "decoder_sparse_step", default=1)
    only = set(hf.get("mlp_only_layers") or [])
    return tuple(i for i in range(_get(hf, "num_hidden_layers")) if i in only or (i + 1) % step)


def parse_mixtral(hf: dict) -> DecoderConfig:
    _check_act(hf)
    return DecoderConfig(
        **_common(hf, eps=1e-5, theta=1e6, windows="all"), num_experts=_get(hf, "num_local_experts", "num_experts"),
        top_k=_get(hf, "num_experts_per_tok"), moe_ffn_size=_get(hf, "intermediate_size"), norm_topk_prob=True,
    )


def parse_qwen3_moe(hf: dict) -> DecoderConfig:
    _check_act(hf)
    bias = bool(hf.get("attention_bias", False))
    return DecoderConfig(
        **_common(hf, eps=1e-6, theta=10000.0, windows="all"), num_experts=_get(hf, "num_experts", "num_local_experts"),
        top_k=_get(hf, "num_experts_per_tok"), moe_ffn_size=_get(hf, "moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_ffn_size=_get(hf, "intermediate_size"),
        dense_layers=_qwen_dense_layers(hf), qk_norm=QKNorm.HEAD, attention_bias=bias, o_proj_bias=bias,
    )


def parse_qwen2_moe(hf: dict) -> DecoderConfig:
    _check_act(hf)
    shared = _get(hf, "shared_expert_intermediate_size", default=0)
    return DecoderConfig(
        **_common(hf, eps=1e-6, theta=10000.0, windows="layer_types"),
        num_experts=_get(hf, "num_experts", "num_local_experts"),
        top_k=_get(hf, "num_experts_per_tok"), moe_ffn_size=_get(hf, "moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_ffn_size=_get(hf, "intermediate_size"),
        dense_layers=_qwen_dense_layers(hf), shared_ffn_size=shared, shared_expert_gate=shared > 0,
        attention_bias=bool(hf.get("qkv_bias", True)),
    )


def parse_olmoe(hf: dict) -> DecoderConfig:
    _check_act(hf)
    bias = bool(hf.get("attention_bias", False))
    return DecoderConfig(
        **_common(hf, eps=1e-5, theta=10000.0), num_experts=_get(hf, "num_experts", "num_local_experts"),
        top_k=_get(hf, "num_experts_per_tok"), moe_ffn_size=_get(hf, "intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), qk_norm=QKNorm.FULL,
        attention_bias=bias, o_proj_bias=bias, clip_qkv=hf.get("clip_qkv"),
    )


def _mla_rope(hf: dict, rope_dim: int, head_dim: int) -> tuple[float, YarnRope | None, RopeScaling | None,
                                                                float | None]:
    """(rope_theta, YaRN or None, linear / llama3 scaling or None, factor for the softmax mscale) from
    ``rope_parameters`` / ``rope_scaling``; ``head_dim`` x ``partial_rotary_factor`` must be the rotary part
    (``transformers``' rotary dims). As ``transformers``' ``yarn_apply_mscale``, any non-default type scales the
    softmax by DeepSeek's mscale when ``mscale_all_dim`` is set."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", rope_dim / head_dim))
    if int(head_dim * partial) != rope_dim:
        raise ValueError(f"rope_parameters.partial_rotary_factor ({partial}) gives {int(head_dim * partial)} rotary "
                         f"dims of head_dim {head_dim}; MLA needs qk_rope_head_dim ({rope_dim})")
    if kind == "default":
        return theta, None, None, None
    if kind == "yarn":
        return theta, _yarn(hf, rope), None, rope.get("factor")
    if kind in ("linear", "llama3"):
        return theta, None, _rope_scaling(kind, rope), rope.get("factor")
    raise ValueError(f"rope_parameters.rope_type ({kind!r}) is not supported; supported: default, linear, llama3, "
                     "yarn")


_INDEXER_KEYS = ("index_topk", "index_n_heads", "index_head_dim")


def _refuse_sparse_attention(hf: dict) -> None:
    """Indexer fields in the config of an architecture without DSA: refused rather than served densely."""
    for key in _INDEXER_KEYS:
        if key in hf:
            raise ValueError(f"{key} ({hf[key]!r}): DeepSeek Sparse Attention (a lightning indexer) is served for "
                             f"DeepseekV32ForCausalLM and GlmMoeDsaForCausalLM, not {hf['architectures'][0]}; it is "
                             "not served as dense attention")


def _indexer(hf: dict, rope_interleave: bool, shared_layers: tuple[int, ...] = ()) -> IndexerConfig:
    topk, heads, dim = (_get(hf, key) for key in _INDEXER_KEYS)
    return IndexerConfig(topk, heads, dim, rope_interleave, shared_layers)


def _glm_shared_layers(hf: dict) -> tuple[int, ...]:
    """GLM-5's layers that reuse the last full layer's top-k: ``indexer_types`` as ``transformers`` derives it
    (``index_topk_pattern``, else ``index_topk_freq`` / ``index_skip_topk_offset``)."""
    layers = _get(hf, "num_hidden_layers")
    types = hf.get("indexer_types")
    if types is None and hf.get("index_topk_pattern") is not None:
        pattern = hf["index_topk_pattern"]
        types = [{"F": "full", "S": "shared"}.get(c, c) for c in pattern] if isinstance(pattern, str) else pattern
    if types is None:
        freq, offset = max(hf.get("index_topk_freq", 1), 1), hf.get("index_skip_topk_offset", 2)
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(layers)]
    if len(types) != layers or set(types) - {"full", "shared"}:
        raise ValueError(f"indexer_types ({types!r}) must list 'full' or 'shared' for each of {layers} layers")
    return tuple(i for i, t in enumerate(types) if t == "shared")


def _deepseek_like(hf: dict, dense_layers: tuple[int, ...], scoring: Scoring, correction_bias: bool,
                   mla_head_dim: int, llama4: bool = False, indexer: IndexerConfig | None = None) -> DecoderConfig:
    """The DeepSeek-V3 shape; ``mla_head_dim``: the head_dim ``partial_rotary_factor`` applies to; ``indexer``:
    DeepSeek Sparse Attention (whose MLA ``transformers`` always ropes interleaved, ignoring ``rope_interleave``)."""
    _check_act(hf)
    if indexer is None:
        _refuse_sparse_attention(hf)
    nope, rope_dim, v = _get(hf, "qk_nope_head_dim"), _get(hf, "qk_rope_head_dim"), _get(hf, "v_head_dim")
    theta, yarn, scaling, mscale_factor = _mla_rope(hf, rope_dim, mla_head_dim)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    mla = MLAConfig(
        kv_lora_rank=_get(hf, "kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v,
        softmax_scale=deepseek_softmax_scale(nope + rope_dim, mscale_factor, rope.get("mscale_all_dim")),
        q_lora_rank=hf.get("q_lora_rank"),
        rope_interleave=indexer is not None or bool(hf.get("rope_interleave", True)),
        llama4_scaling_beta=rope.get("llama_4_scaling_beta") if llama4 else None,
        llama4_max_positions=int(rope.get("original_max_position_embeddings") or 1), indexer=indexer)
    common = _common({**hf, "rope_parameters": None, "rope_scaling": None, "rope_theta": theta}, eps=1e-6, theta=theta)
    heads = common["num_heads"]
    common.update(num_kv_heads=heads, head_dim=rope_dim, yarn=yarn, rope_scaling=scaling)  # K, V per head from the
    # latent
    experts = _get(hf, "n_routed_experts", "num_local_experts")
    moe_ffn = _get(hf, "moe_intermediate_size")
    return DecoderConfig(
        **common, num_experts=experts, top_k=_get(hf, "num_experts_per_tok"), moe_ffn_size=moe_ffn,
        norm_topk_prob=bool(_get(hf, "norm_topk_prob", default=True)),
        shared_ffn_size=moe_ffn * _get(hf, "n_shared_experts", default=0),
        dense_ffn_size=_get(hf, "intermediate_size"), dense_layers=dense_layers,
        attention_bias=bool(hf.get("attention_bias", False)), mla=mla, scoring=scoring,
        correction_bias=correction_bias, num_groups=_get(hf, "n_group", default=1),
        topk_groups=_get(hf, "topk_group", default=1),
        routed_scaling_factor=float(_get(hf, "routed_scaling_factor", default=1.0)),
        num_mtp_layers=int(_get(hf, "num_nextn_predict_layers", default=0)),
    )


def _first_k_dense(hf: dict, default: int) -> tuple[int, ...]:
    freq = hf.get("moe_layer_freq", 1)
    if freq != 1:
        raise ValueError(f"moe_layer_freq ({freq!r}) is not supported; only 1 (every layer after "
                         "first_k_dense_replace is MoE) is")
    return tuple(range(min(_get(hf, "first_k_dense_replace", default=default), _get(hf, "num_hidden_layers"))))


def _check_deepseek_routing(hf: dict) -> None:
    for key, wanted in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if hf.get(key, wanted) != wanted:  # keys of DeepSeek's own config.json (transformers ignores them)
            raise ValueError(f"{key} ({hf[key]!r}) is not supported; DeepSeek-V3 routing is {key}={wanted!r}")


def parse_deepseek_v3(hf: dict) -> DecoderConfig:
    _check_deepseek_routing(hf)
    return _deepseek_like(hf, _first_k_dense(hf, 3), Scoring.SIGMOID, True, _get(hf, "qk_rope_head_dim"))


def _mlp_layer_types(hf: dict, default: list[str]) -> tuple[int, ...]:
    layers = _get(hf, "num_hidden_layers")
    types = hf.get("mlp_layer_types") or default
    bad = sorted(set(types) - {"dense", "sparse"})
    if len(types) != layers or bad:
        raise ValueError(f"mlp_layer_types ({types!r}) must list 'dense' or 'sparse' for each of {layers} layers")
    return tuple(i for i, t in enumerate(types) if t == "dense")


def parse_glm4_moe_lite(hf: dict) -> DecoderConfig:
    dense = _mlp_layer_types(hf, ["dense"] + ["sparse"] * (_get(hf, "num_hidden_layers") - 1))
    return _deepseek_like(hf, dense, Scoring.SIGMOID, True, _get(hf, "qk_rope_head_dim"))


def _rotary_dim(hf: dict, head_dim: int, default_partial: float) -> int:
    """The rotated leading dims of a GQA head: ``head_dim`` x ``partial_rotary_factor`` (``rope_parameters``, else
    the top level, else the family's default)."""
    rope = hf.get("rope_parameters") or {}
    return int(head_dim * float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial))))


def parse_glm4_moe(hf: dict) -> DecoderConfig:
    """GLM-4.5 / 4.6: GQA with partial rotary (NeoX halves), q/k biases, optional per-head q/k norms, leading
    dense layers, and DeepSeek-V3's router (sigmoid + correction bias, grouped top-k, scaling) with shared experts."""
    _check_act(hf)
    _refuse_sparse_attention(hf)
    common = _common(hf, eps=1e-5, theta=10000.0)
    layers, moe_ffn = common["num_layers"], _get(hf, "moe_intermediate_size")
    first = min(_get(hf, "first_k_dense_replace", default=1), layers)
    return DecoderConfig(
        **common, num_experts=_get(hf, "n_routed_experts"), top_k=_get(hf, "num_experts_per_tok"),
        moe_ffn_size=moe_ffn, norm_topk_prob=bool(_get(hf, "norm_topk_prob", default=True)),
        shared_ffn_size=moe_ffn * _get(hf, "n_shared_experts", default=1), dense_ffn_size=_get(hf, "intermediate_size"),
        dense_layers=tuple(range(first)), qk_norm=QKNorm.HEAD if hf.get("use_qk_norm") else QKNorm.NONE,
        attention_bias=bool(hf.get("attention_bias", False)), scoring=Scoring.SIGMOID, correction_bias=True,
        num_groups=_get(hf, "n_group", default=1), topk_groups=_get(hf, "topk_group", default=1),
        routed_scaling_factor=float(_get(hf, "routed_scaling_factor", default=1.0)),
        rotary_dim=_rotary_dim(hf, common["head_dim"], default_partial=0.5),
    )


def parse_minimax_m2(hf: dict) -> DecoderConfig:
    """MiniMax-M2: GQA with partial rotary and q/k norms over all heads, sigmoid routing with a selection bias
    (kept beside the gate), renormalised top-k, no shared expert."""
    _check_act(hf)
    common = _common(hf, eps=1e-6, theta=5e6)
    return DecoderConfig(
        **common, num_experts=_get(hf, "num_local_experts"), top_k=_get(hf, "num_experts_per_tok"),
        moe_ffn_size=_get(hf, "intermediate_size"), norm_topk_prob=True, qk_norm=QKNorm.FULL,
        scoring=Scoring.SIGMOID, correction_bias=True,
        rotary_dim=_rotary_dim(hf, common["head_dim"], default_partial=1.0),
    )


def parse_gpt_oss(hf: dict) -> DecoderConfig:
    """gpt-oss: GQA with q/k/v/o biases and attention sinks, sliding-window and full layers alternating
    (``layer_types``), YaRN; every layer MoE: top-k on the router's logits (with a bias), softmax over the k, experts
    with biases and the clamped ``(up + 1) * gate * sigmoid(alpha * gate)`` (``Activation.SWIGLU_OAI``)."""
    _refuse_sparse_attention(hf)
    bias = bool(hf.get("attention_bias", True))
    return DecoderConfig(
        **_common(hf, eps=1e-5, theta=150000.0, windows="layer_types"), num_experts=_get(hf, "num_local_experts"),
        top_k=_get(hf, "num_experts_per_tok"), moe_ffn_size=_get(hf, "intermediate_size"),
        attention_bias=bias, o_proj_bias=bias, attention_sinks=True, scoring=Scoring.SOFTMAX_TOPK,
        router_bias=True, activation=Activation.SWIGLU_OAI, expert_bias=True,
        swiglu_alpha=float(_get(hf, "swiglu_alpha", default=1.702)),
        swiglu_limit=float(_get(hf, "swiglu_limit", default=7.0)),
    )


def parse_llama4(hf: dict) -> DecoderConfig:
    """Llama 4 text: chunked local attention on the roped layers (``layer_types``), NoPE layers
    (``no_rope_layers[i] == 0``) with temperature tuning, L2-normed q/k after RoPE on roped layers, RoPE on
    interleaved pairs (llama3 scaling); MoE layers (``moe_layers``) route top-k by sigmoid scores that scale the
    expert input, beside a shared expert; the other layers a dense MLP of ``intermediate_size_mlp``."""
    _check_act(hf)
    _refuse_sparse_attention(hf)
    layers = _get(hf, "num_hidden_layers")
    no_rope = hf.get("no_rope_layers") or [int((i + 1) % _get(hf, "no_rope_layer_interval", default=4) != 0)
                                            for i in range(layers)]
    if len(no_rope) != layers:
        raise ValueError(f"no_rope_layers ({no_rope!r}) must have one entry for each of {layers} layers")
    step = _get(hf, "interleave_moe_layer_step", default=1)
    moe_layers = set(hf["moe_layers"] if hf.get("moe_layers") is not None else range(step - 1, layers, step))
    if hf.get("layer_types") is None:  # as transformers derives it: the roped layers chunked
        chunked = hf.get("attention_chunk_size") is not None
        hf = {**hf, "layer_types": ["chunked_attention" if rope and chunked else "full_attention" for rope in no_rope]}
    common = _common(hf, eps=1e-5, theta=500000.0, windows="layer_types")
    bias = bool(hf.get("attention_bias", False))
    return DecoderConfig(
        **common, num_experts=_get(hf, "num_local_experts"), top_k=_get(hf, "num_experts_per_tok"),
        moe_ffn_size=_get(hf, "intermediate_size"), norm_topk_prob=False, shared_ffn_size=_get(hf, "intermediate_size"),
        dense_ffn_size=_get(hf, "intermediate_size_mlp"), dense_layers=tuple(i for i in range(layers)
                                                                             if i not in moe_layers),
        qk_norm=QKNorm.L2 if hf.get("use_qk_norm", True) else QKNorm.NONE, attention_bias=bias, o_proj_bias=bias,
        scoring=Scoring.SIGMOID, router_on_input=True, rope_interleave=True,
        nope_layers=tuple(i for i, rope in enumerate(no_rope) if not rope),
        attn_temperature=(float(_get(hf, "floor_scale", default=8192)), float(_get(hf, "attn_scale", default=0.1)))
        if hf.get("attn_temperature_tuning", True) else None,
    )


def _dsa_dense_layers(hf: dict) -> tuple[int, ...]:
    """``mlp_layer_types`` (``transformers`` writes it), else DeepSeek's ``first_k_dense_replace`` (default 3)."""
    layers = _get(hf, "num_hidden_layers")
    first = min(_get(hf, "first_k_dense_replace", default=3), layers)
    return _mlp_layer_types(hf, ["dense"] * first + ["sparse"] * (layers - first))


def parse_deepseek_v32(hf: dict) -> DecoderConfig:
    """DeepSeek-V3.2: DeepSeek-V3 plus the lightning indexer, its RoPE on halves."""
    _check_deepseek_routing(hf)
    return _deepseek_like(hf, _dsa_dense_layers(hf), Scoring.SIGMOID, True, _get(hf, "qk_rope_head_dim"),
                          indexer=_indexer(hf, rope_interleave=False))


def parse_glm_moe_dsa(hf: dict) -> DecoderConfig:
    """GLM-5: DeepSeek-V3.2 with the indexer's RoPE interleaved, and layers that share the last full one's top-k."""
    return _deepseek_like(hf, _dsa_dense_layers(hf), Scoring.SIGMOID, True, _get(hf, "qk_rope_head_dim"),
                          indexer=_indexer(hf, rope_interleave=True, shared_layers=_glm_shared_layers(hf)))


def parse_mistral4(hf: dict) -> DecoderConfig:
    head_dim = _get(hf, "qk_nope_head_dim") + _get(hf, "qk_rope_head_dim")
    return _deepseek_like(hf, _first_k_dense(hf, 0), Scoring.SOFTMAX, False, head_dim, llama4=True)


_HF_NAMES = ("gate_proj", "up_proj", "down_proj")

_LLAMA4 = Family(parse_llama4, ("feed_forward",), _HF_NAMES, expert_layout="llama4", dense_prefix="feed_forward")
ARCHITECTURES: MappingProxyType[str, Family] = MappingProxyType({
    "MixtralForCausalLM": Family(parse_mixtral, ("block_sparse_moe", "mlp"), ("w1", "w3", "w2")),
    "Qwen3MoeForCausalLM": Family(parse_qwen3_moe, ("mlp",), _HF_NAMES),
    "Qwen2MoeForCausalLM": Family(parse_qwen2_moe, ("mlp",), _HF_NAMES),
    "OlmoeForCausalLM": Family(parse_olmoe, ("mlp",), _HF_NAMES),
    "DeepseekV3ForCausalLM": Family(parse_deepseek_v3, ("mlp",), _HF_NAMES, "shared_experts"),
    "Glm4MoeForCausalLM": Family(parse_glm4_moe, ("mlp",), _HF_NAMES, "shared_experts"),
    "MiniMaxM2ForCausalLM": Family(parse_minimax_m2, ("block_sparse_moe", "mlp"), ("w1", "w3", "w2"),
                                   correction_bias_name="e_score_correction_bias"),
    "Glm4MoeLiteForCausalLM": Family(parse_glm4_moe_lite, ("mlp",), _HF_NAMES, "shared_experts"),
    "Mistral4ForCausalLM": Family(parse_mistral4, ("mlp",), _HF_NAMES, "shared_experts"),
    "DeepseekV32ForCausalLM": Family(parse_deepseek_v32, ("mlp",), _HF_NAMES, "shared_experts"),
    "GlmMoeDsaForCausalLM": Family(parse_glm_moe_dsa, ("mlp",), _HF_NAMES, "shared_experts"),
    "GptOssForCausalLM": Family(parse_gpt_oss, ("mlp",), _HF_NAMES, expert_layout="gpt_oss"),
    "Llama4ForCausalLM": _LLAMA4,
    "Llama4ForConditionalGeneration": dataclasses.replace(
        _LLAMA4, text_model=("language_model.", ("vision_model.", "multi_modal_projector."))),
})


def with_transformers_defaults(hf: dict) -> dict:
    """``config.json`` completed as ``transformers`` reads it: a field it leaves out takes the value the family's
    config class gives it, built from this same ``config.json`` (so derived fields such as ``layer_types`` agree).
    A config ``transformers`` cannot build is returned as it is; its own fields are then checked by ``parse``."""
    from huggingface_hub.errors import StrictDataclassError  # (as transformers: not at import)
    from transformers import AutoConfig

    try:
        fields = {k: v for k, v in hf.items() if k != "model_type"}
        full = AutoConfig.for_model(hf.get("model_type", ""), **fields).to_dict()
    except (ValueError, KeyError, TypeError, StrictDataclassError):  # (the last: a field transformers validates)
        return hf
    return {**full, **hf}


def family_for(hf: dict) -> Family:
    """The :class:`Family` of a parsed ``config.json``; ``ValueError`` naming the architecture if unknown."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(
        f"architectures ({archs!r}) is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
    )
