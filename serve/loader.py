"""Load a Hugging Face MoE checkpoint directory (``config.json`` + ``*.safetensors``) into a ``MoEDecoder``.

One table, :func:`tensor_map`, says where every on-disk tensor lives in our model: ``(hf_key, param, index)``
with ``param[index]`` shaped like the tensor. Loading copies through it, :func:`save_safetensors` reads through
it, and a coverage check proves it fills every parameter. Everything is checked before serving starts:
unknown architectures, missing or mis-shaped tensors raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hypermoe import HyperMoEConfig, HyperMoELayer
from serve.models import Family, ModelConfig, MoEDecoder, family_for

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; we recompute them


@dataclass(frozen=True)
class Entry:
    hf_key: str
    param: str
    index: tuple = ()


def read_config(path: str | Path) -> tuple[dict, Family, ModelConfig]:
    """``config.json`` (+ ``generation_config.json``'s eos ids) -> (raw dict, family, :class:`ModelConfig`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model ({str(path)!r}) has no config.json")
    hf = json.loads((path / "config.json").read_text())
    hf = hf.get("text_config", hf) if "architectures" not in hf else hf
    family = family_for(hf)
    config = family.parse(hf)
    if hf.get("hypermoe") is not None:
        config.hypermoe = _hypermoe_config(hf["hypermoe"], config)
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
        config.eos_token_ids = tuple(dict.fromkeys(config.eos_token_ids + tuple(extra)))
    return hf, family, config


def _hypermoe_config(raw, config: ModelConfig) -> HyperMoEConfig:
    names = {f.name for f in dataclasses.fields(HyperMoEConfig)}
    if not isinstance(raw, dict) or set(raw) - names:
        raise ValueError(f"config.json hypermoe ({raw!r}) must be an object with HyperMoEConfig fields: "
                         f"{', '.join(sorted(names))}")
    num_moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    return HyperMoEConfig(**{**raw, "num_layers": max(raw.get("num_layers", 1), num_moe_layers)})


def _hypermoe_entries(config: ModelConfig, family: Family, keys: set[str]) -> list[Entry]:
    """HyperMoE's tensors under our own keys: ``<moe block>.hypermoe.*`` per layer (expert embeddings, the
    processing MLP) and ``model.hypermoe.hypernetwork.*`` once (shared, stored under the first MoE layer)."""
    hm, E, K, D = config.hypermoe, config.num_experts, config.top_k, config.hidden_size
    with torch.device("meta"):
        layer = HyperMoELayer(hm, E, K, D)
    own = [n for n, _ in layer.named_parameters() if not n.startswith("hypernetwork.")]
    shared = [n for n, _ in layer.hypernetwork.named_parameters()]
    moe_layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    entries = []
    for i in moe_layers:
        prefix, _ = _layer_layout(config, family, i, keys)
        entries += [Entry(f"model.layers.{i}.{prefix}.hypermoe.{n}", f"layers.{i}.mlp.hypermoe.{n}") for n in own]
    first = f"layers.{moe_layers[0]}.mlp.hypermoe.hypernetwork."
    return entries + [Entry(f"model.hypermoe.hypernetwork.{n}", first + n) for n in shared]


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for name in names:
            if not (path / name).is_file():
                raise ValueError(f"shard {name!r} listed in {index.name} is missing from {path}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model ({str(path)!r}) has no *.safetensors files")
    return files


def _layer_layout(config: ModelConfig, family: Family, layer: int, keys: set[str]) -> tuple[str, bool]:
    """(MoE block prefix, fused experts?) as found on disk; defaults to the per-expert form ``transformers`` saves."""
    base = f"model.layers.{layer}."
    gate = family.expert_names[0]
    for prefix in family.moe_prefixes:
        if base + f"{prefix}.experts.gate_up_proj" in keys:
            return prefix, True
        if base + f"{prefix}.experts.0.{gate}.weight" in keys:
            return prefix, False
    return family.moe_prefixes[0], False


def tensor_map(config: ModelConfig, family: Family, keys: set[str] = frozenset()) -> list[Entry]:
    """Every checkpoint tensor and the slice of our parameter it fills (layouts detected from ``keys``)."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    entries = [Entry("model.embed_tokens.weight", "embed_tokens.weight"), Entry("model.norm.weight", "norm.weight")]
    if not config.tie_word_embeddings:
        entries.append(Entry("lm_head.weight", "lm_head.weight"))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            entries.append(Entry(hf + norm + ".weight", ours + norm + ".weight"))
        attn, at = hf + "self_attn.", ours + "self_attn."
        rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
        for name, sl in rows.items():
            entries.append(Entry(attn + name + ".weight", at + "qkv_proj.weight", (sl,)))
            if config.attention_bias:
                entries.append(Entry(attn + name + ".bias", at + "qkv_proj.bias", (sl,)))
        entries.append(Entry(attn + "o_proj.weight", at + "o_proj.weight"))
        if config.o_proj_bias:
            entries.append(Entry(attn + "o_proj.bias", at + "o_proj.bias"))
        if config.qk_norm.value != "none":
            entries += [Entry(attn + "q_norm.weight", at + "q_norm.weight"),
                        Entry(attn + "k_norm.weight", at + "k_norm.weight")]
        if config.is_moe_layer(i):
            entries += _moe_entries(config, family, i, keys)
        else:
            entries += _mlp_entries(hf + "mlp.", ours + "mlp.", config.dense_ffn_size, ("w13_XD", "w2_DS"))
    if config.hypermoe is not None:
        entries += _hypermoe_entries(config, family, keys)
    return entries


def _mlp_entries(hf: str, ours: str, ffn: int, names: tuple[str, str], index: tuple = ()) -> list[Entry]:
    w13, w2 = names
    return [Entry(hf + "gate_proj.weight", ours + w13, index + (slice(0, ffn),)),
            Entry(hf + "up_proj.weight", ours + w13, index + (slice(ffn, 2 * ffn),)),
            Entry(hf + "down_proj.weight", ours + w2, index)]


def _moe_entries(config: ModelConfig, family: Family, layer: int, keys: set[str]) -> list[Entry]:
    prefix, fused = _layer_layout(config, family, layer, keys)
    hf, ours = f"model.layers.{layer}.{prefix}.", f"layers.{layer}.mlp."
    F = config.moe_ffn_size
    entries = [Entry(hf + "gate.weight", ours + "router.weight")]
    if fused:  # transformers-5 in-memory layout: [E, 2F, D] gate rows then up rows, [E, D, F]
        entries += [Entry(hf + "experts.gate_up_proj", ours + "experts.w13_E2FD"),
                    Entry(hf + "experts.down_proj", ours + "experts.w2_EDF")]
    else:
        gate, up, down = family.expert_names
        for e in range(config.num_experts):
            x = f"{hf}experts.{e}."
            entries += [Entry(x + gate + ".weight", ours + "experts.w13_E2FD", (e, slice(0, F))),
                        Entry(x + up + ".weight", ours + "experts.w13_E2FD", (e, slice(F, 2 * F))),
                        Entry(x + down + ".weight", ours + "experts.w2_EDF", (e,))]
    if config.shared_ffn_size:
        entries += _mlp_entries(hf + "shared_expert.", ours + "shared_expert.", config.shared_ffn_size,
                                ("w13_XD", "w2_DS"))
        if config.shared_expert_gate:
            entries.append(Entry(hf + "shared_expert_gate.weight", ours + "shared_expert.gate_weight"))
    return entries


def _build(config: ModelConfig, dtype: torch.dtype) -> MoEDecoder:
    with torch.device("meta"):
        model = MoEDecoder(config)
    model = model.to_empty(device="cpu").to(dtype)
    if config.tie_word_embeddings:  # to_empty re-creates parameters one module at a time
        model.lm_head.weight = model.embed_tokens.weight
    model.init_buffers()
    return model.eval().requires_grad_(False)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, hypermoe: bool | None = None) -> MoEDecoder:
    """Build and fill a :class:`MoEDecoder` from a HF directory; raises ``ValueError`` naming any bad key.

    ``hypermoe``: None serves what the checkpoint is; True/False insist that it is / is not a HyperMoE one."""
    path = Path(path)
    _, family, config = read_config(path)
    if hypermoe is not None and hypermoe != (config.hypermoe is not None):
        raise ValueError(f"hypermoe ({hypermoe}) but checkpoint {path} is {'' if config.hypermoe else 'not '}a "
                         "HyperMoE checkpoint (config.json key 'hypermoe')")
    model = _build(config, dtype)
    params = dict(model.named_parameters())
    filled = dict.fromkeys(params, 0)
    with contextlib.ExitStack() as stack:
        handles = {}
        for file in _files(path):
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            handles.update(dict.fromkeys(handle.keys(), handle))
        entries = tensor_map(config, family, set(handles))
        for entry in entries:
            if entry.hf_key not in handles:
                raise ValueError(f"checkpoint {path} is missing tensor {entry.hf_key!r}")
            target = params[entry.param][entry.index]
            shape = tuple(handles[entry.hf_key].get_slice(entry.hf_key).get_shape())
            if shape != tuple(target.shape):
                raise ValueError(f"tensor {entry.hf_key!r} has shape {shape}, expected {tuple(target.shape)}")
            target.copy_(handles[entry.hf_key].get_tensor(entry.hf_key))
            filled[entry.param] += target.numel()
        used = {e.hf_key for e in entries}
        unused = sorted(k for k in handles if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if unused:
        warnings.warn(f"checkpoint {path} has {len(unused)} tensors the model does not use, e.g. {unused[:3]}")
    for name, count in filled.items():
        if count != params[name].numel():  # a bug in tensor_map, not in the checkpoint
            raise ValueError(f"parameter {name!r} filled {count} of {params[name].numel()} elements")
    return model


def save_safetensors(model: MoEDecoder, family: Family, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write ``model.safetensors`` with the per-expert key names ``transformers`` uses for ``family``."""
    params = dict(model.named_parameters())
    tensors = {}
    for entry in tensor_map(model.config, family):
        t = params[entry.param].detach()[entry.index]
        tensors[entry.hf_key] = t.to(dtype or t.dtype).contiguous()
    save_file(tensors, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
