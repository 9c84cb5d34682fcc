"""The Hugging Face architectures we serve: how each ``config.json`` maps to a :class:`DecoderConfig`, and the
on-disk names of its MoE block's tensors.

Every family here is "Llama attention + an MoE feed-forward"; they differ in config field names, q/k norms,
attention biases, the router's renormalisation, shared experts and where the MoE block's tensors live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from serve.models.config import DecoderConfig, QKNorm

_MISSING = object()


@dataclass(frozen=True)
class Family:
    """One HF architecture: ``parse(config_json) -> DecoderConfig`` and its checkpoint key names.

    ``moe_prefixes``: where a layer's MoE block lives, relative to ``model.layers.{i}.`` (``transformers``
    5 saves Mixtral's under the legacy ``block_sparse_moe``; a raw fused dump uses ``mlp``).
    ``expert_names``: the per-expert (gate, up, down) projection names.
    """

    parse: Callable[[dict], DecoderConfig]
    moe_prefixes: tuple[str, ...]
    expert_names: tuple[str, str, str]


def _get(hf: dict, *keys: str, default: Any = _MISSING) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    if default is _MISSING:
        raise ValueError(f"config.json has no {' or '.join(keys)}")
    return default


def _rope_theta(hf: dict, default: float) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_parameters.rope_type ({kind!r}) is not supported; only 'default' RoPE is")
    return float(rope.get("rope_theta", hf.get("rope_theta", default)))


def _common(hf: dict, eps: float, theta: float) -> dict:
    heads = _get(hf, "num_attention_heads")
    max_pos = _get(hf, "max_position_embeddings")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window:  # attention equals full attention while the context fits the window
        max_pos = min(max_pos, int(window))
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
        rope_theta=_rope_theta(hf, theta),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        bos_token_id=hf.get("bos_token_id"),
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
        **_common(hf, eps=1e-5, theta=1e6), num_experts=_get(hf, "num_local_experts", "num_experts"),
        top_k=_get(hf, "num_experts_per_tok"), moe_ffn_size=_get(hf, "intermediate_size"), norm_topk_prob=True,
    )


def parse_qwen3_moe(hf: dict) -> DecoderConfig:
    _check_act(hf)
    bias = bool(hf.get("attention_bias", False))
    return DecoderConfig(
        **_common(hf, eps=1e-6, theta=10000.0), num_experts=_get(hf, "num_experts", "num_local_experts"),
        top_k=_get(hf, "num_experts_per_tok"), moe_ffn_size=_get(hf, "moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_ffn_size=_get(hf, "intermediate_size"),
        dense_layers=_qwen_dense_layers(hf), qk_norm=QKNorm.HEAD, attention_bias=bias, o_proj_bias=bias,
    )


def parse_qwen2_moe(hf: dict) -> DecoderConfig:
    _check_act(hf)
    shared = _get(hf, "shared_expert_intermediate_size", default=0)
    return DecoderConfig(
        **_common(hf, eps=1e-6, theta=10000.0), num_experts=_get(hf, "num_experts", "num_local_experts"),
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


_HF_NAMES = ("gate_proj", "up_proj", "down_proj")

ARCHITECTURES: MappingProxyType[str, Family] = MappingProxyType({
    "MixtralForCausalLM": Family(parse_mixtral, ("block_sparse_moe", "mlp"), ("w1", "w3", "w2")),
    "Qwen3MoeForCausalLM": Family(parse_qwen3_moe, ("mlp",), _HF_NAMES),
    "Qwen2MoeForCausalLM": Family(parse_qwen2_moe, ("mlp",), _HF_NAMES),
    "OlmoeForCausalLM": Family(parse_olmoe, ("mlp",), _HF_NAMES),
})


def family_for(hf: dict) -> Family:
    """The :class:`Family` of a parsed ``config.json``; ``ValueError`` naming the architecture if unknown."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(
        f"architectures ({archs!r}) is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
    )
