"""Load a Hugging Face MoE checkpoint directory (``config.json`` + ``*.safetensors``) into a ``MoEDecoder``.

One table, :func:`tensor_map`, says where every on-disk tensor lives in our model: ``(hf_key, param, index)``
with ``param[index]`` shaped like the tensor. Loading copies through it, :func:`save_safetensors` reads through
it, and a coverage check proves it fills every parameter. Everything is checked before serving starts:
unknown architectures, missing or mis-shaped tensors raise ``ValueError`` naming the key.

FP8: routed experts become ``quant.Fp8Experts`` when asked (``quantization=``, quantised while loading) or when
``config.json`` declares DeepSeek-V3 / ``transformers`` FP8 (e4m3 tensors, ``<key>_scale_inv`` block scales);
every other FP8 tensor (attention, MLA's LoRA and ``kv_b_proj``, shared experts, dense layers) is dequantised
into the serving dtype at load. DeepSeek's multi-token-prediction layers (``num_nextn_predict_layers`` layers
after the last) are recognised and skipped with a log line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hypermoe import HyperMoEConfig, HyperMoELayer
from moe.config import Backend, Quant
from moe.fields import enum_field
from quant import Fp8Experts, quantize_fp8
from quant.fp8 import BLOCK, FP8, dequantize_weight
from routing import Router
from serve.models import DecoderConfig, Family, MoEDecoder, family_for
from serve.models.checkpoint_layouts import LAYOUTS, MXFP4_BLOCKS, MXFP4_SCALES
from serve.models.registry import with_transformers_defaults
from serve.models.sparse_attention import Indexer

log = logging.getLogger("moe-serve")

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; we recompute them
SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3 / transformers FP8: "<key>_scale_inv" holds <key>'s 128x128 block scales
# config.json's quantization_config of the FP8 checkpoints we read and write (DeepSeek-V3, transformers "fp8")
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}


@dataclass(frozen=True)
class Entry:
    """``hf_key`` fills ``param[index]``; ``layout``: a :data:`LAYOUTS` conversion on the way (empty: as stored).
    An MXFP4 entry's key is its ``<name>_blocks`` tensor; ``<name>_scales`` is read with it."""

    hf_key: str
    param: str
    index: tuple = ()
    layout: str = ""

    def companion_keys(self) -> tuple[str, ...]:
        if self.layout.startswith("mxfp4"):
            return (self.hf_key.removesuffix(MXFP4_BLOCKS) + MXFP4_SCALES,)
        return (self.hf_key + SCALE_SUFFIX,)


def read_config(path: str | Path) -> tuple[dict, Family, DecoderConfig]:
    """``config.json`` (+ ``generation_config.json``'s eos ids) -> (raw dict, family, :class:`DecoderConfig`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model ({str(path)!r}) has no config.json")
    hf = json.loads((path / "config.json").read_text())
    hf = hf.get("text_config", hf) if "architectures" not in hf else hf
    family = family_for(hf)
    if family.text_model is not None:  # a multimodal checkpoint: its text model's config, under its architecture
        hf = {**hf.get("text_config", {}), "architectures": hf["architectures"]}
    hf = with_transformers_defaults(hf)
    config = family.parse(hf)
    if hf.get("hypermoe") is not None:
        config.hypermoe = _hypermoe_config(hf["hypermoe"], config)
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
        config.eos_token_ids = tuple(dict.fromkeys(config.eos_token_ids + tuple(extra)))
    return hf, family, config


def checkpoint_quant(hf: dict) -> Quant | None:
    """The FP8 format ``config.json``'s ``quantization_config`` declares (None: none, or MXFP4, which is
    dequantised at load: :mod:`serve.models.checkpoint_layouts`); ``ValueError`` naming the field for formats we
    cannot serve."""
    qc = hf.get("quantization_config")
    if qc is None or qc.get("quant_method") == "mxfp4":  # gpt-oss's MXFP4 experts: dequantised at load
        return None
    # transformers' FineGrainedFP8Config defaults for keys DeepSeek-V3's config.json leaves out, and vice versa
    defaults = {"fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "float", "expert_dtype": "fp8"}
    accepted = {**defaults, **QUANTIZATION_CONFIG}
    for key, wanted in accepted.items():
        value = qc.get(key, defaults.get(key))
        if (list(value) if isinstance(value, (list, tuple)) else value) != wanted:
            raise ValueError(f"quantization_config.{key} ({value!r}) is not supported; FP8 checkpoints must have "
                             f"{', '.join(f'{k}={v!r}' for k, v in accepted.items())}")
    return Quant.FP8_BLOCK


def _resolve_quant(quantization: str | Quant | None, on_disk: Quant | None, path: Path) -> Quant | None:
    wanted = None if quantization is None else enum_field(Quant, "quantization", quantization)
    if on_disk is None or wanted in (None, on_disk):
        return wanted or on_disk
    raise ValueError(f"quantization ({wanted.value!r}) does not match checkpoint {path}, which is "
                     f"{on_disk.value!r} (config.json quantization_config)")


def _hypermoe_config(raw, config: DecoderConfig) -> HyperMoEConfig:
    names = {f.name for f in dataclasses.fields(HyperMoEConfig)}
    if not isinstance(raw, dict) or set(raw) - names:
        raise ValueError(f"config.json hypermoe ({raw!r}) must be an object with HyperMoEConfig fields: "
                         f"{', '.join(sorted(names))}")
    num_moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    return HyperMoEConfig(**{**raw, "num_layers": max(raw.get("num_layers", 1), num_moe_layers)})


def _hypermoe_entries(config: DecoderConfig, family: Family, keys: set[str]) -> list[Entry]:
    """HyperMoE's tensors under our own keys: ``<moe block>.hypermoe.*`` per layer (expert embeddings, the
    processing MLP) and ``model.hypermoe.hypernetwork.*`` once (shared, stored under the first MoE layer)."""
    hm, E, K, D = config.hypermoe, config.num_experts, config.top_k, config.hidden_size
    with torch.device("meta"), _no_random_init():
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


def _layer_layout(config: DecoderConfig, family: Family, layer: int, keys: set[str]) -> tuple[str, bool]:
    """(MoE block prefix, fused experts?) as found on disk; defaults to the per-expert form ``transformers`` saves."""
    base = f"model.layers.{layer}."
    gate = family.expert_names[0]
    for prefix in family.moe_prefixes:
        if base + f"{prefix}.experts.gate_up_proj" in keys:
            return prefix, True
        if base + f"{prefix}.experts.0.{gate}.weight" in keys:
            return prefix, False
    return family.moe_prefixes[0], False


def tensor_map(config: DecoderConfig, family: Family, keys: set[str] = frozenset()) -> list[Entry]:
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
        if config.mla is not None:
            entries += _mla_entries(config, attn, at, i)
        else:
            entries += _gqa_entries(config, attn, at, q, kv)
        if config.is_moe_layer(i):
            entries += _moe_entries(config, family, i, keys)
        else:
            entries += _mlp_entries(f"{hf}{family.dense_prefix}.", ours + "mlp.", config.dense_ffn_size,
                                    ("w13_XD", "w2_DS"))
    if config.hypermoe is not None:
        entries += _hypermoe_entries(config, family, keys)
    return entries


def _gqa_entries(config: DecoderConfig, attn: str, at: str, q: int, kv: int) -> list[Entry]:
    """One fused ``qkv_proj``: q rows, then k rows, then v rows."""
    entries = []
    rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    for name, sl in rows.items():
        entries.append(Entry(attn + name + ".weight", at + "qkv_proj.weight", (sl,)))
        if config.attention_bias:
            entries.append(Entry(attn + name + ".bias", at + "qkv_proj.bias", (sl,)))
    entries.append(Entry(attn + "o_proj.weight", at + "o_proj.weight"))
    if config.attention_sinks:
        entries.append(Entry(attn + "sinks", at + "sinks"))
    if config.o_proj_bias:
        entries.append(Entry(attn + "o_proj.bias", at + "o_proj.bias"))
    if config.qk_norm.value in ("head", "full"):  # (Llama 4's L2 norm has no weights)
        entries += [Entry(attn + "q_norm.weight", at + "q_norm.weight"),
                    Entry(attn + "k_norm.weight", at + "k_norm.weight")]
    return entries


def _mla_entries(config: DecoderConfig, attn: str, at: str, layer: int) -> list[Entry]:
    """MLA keeps ``transformers``' module names: one entry per tensor, same name on both sides (DeepSeek Sparse
    Attention's ``indexer.*`` too)."""
    names = ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    if config.mla.has_indexer(layer):
        names += [f"indexer.{n}" for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                           "weights_proj.weight")]
    if config.mla.q_lora_rank is None:
        names.append("q_proj.weight")
    else:
        names += ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"]
    if config.attention_bias:
        names += ["kv_a_proj_with_mqa.bias", "o_proj.bias"] + ([] if config.mla.q_lora_rank is None else
                                                              ["q_a_proj.bias"])
    return [Entry(attn + n, at + n) for n in names]


def _mlp_entries(hf: str, ours: str, ffn: int, names: tuple[str, str], index: tuple = ()) -> list[Entry]:
    w13, w2 = names
    return [Entry(hf + "gate_proj.weight", ours + w13, index + (slice(0, ffn),)),
            Entry(hf + "up_proj.weight", ours + w13, index + (slice(ffn, 2 * ffn),)),
            Entry(hf + "down_proj.weight", ours + w2, index)]


def _gpt_oss_moe_entries(hf: str, ours: str, keys: set[str]) -> list[Entry]:
    """gpt-oss: ``router`` with a bias; experts ``[E, in, out]`` with gate/up interleaved and biases, or their MXFP4
    ``_blocks`` / ``_scales`` (``[E, out, in]``) as released (:mod:`serve.models.checkpoint_layouts`)."""
    x, e = hf + "experts.", ours + "experts."
    if x + "gate_up_proj" + MXFP4_BLOCKS in keys:
        gate_up, down = ("gate_up_proj" + MXFP4_BLOCKS, "mxfp4_gate_up"), ("down_proj" + MXFP4_BLOCKS, "mxfp4")
    else:
        gate_up, down = ("gate_up_proj", "gate_up_in_out"), ("down_proj", "in_out")
    return [Entry(hf + "router.weight", ours + "router.weight"), Entry(hf + "router.bias", ours + "router.bias"),
            Entry(x + gate_up[0], e + "w13_E2FD", layout=gate_up[1]), Entry(x + down[0], e + "w2_EDF", layout=down[1]),
            Entry(x + "gate_up_proj_bias", e + "b13_E2F", layout="gate_up_bias"),
            Entry(x + "down_proj_bias", e + "b2_ED")]


def _llama4_moe_entries(config: DecoderConfig, hf: str, ours: str) -> list[Entry]:
    """Llama 4: ``router``; experts ``[E, in, out]`` (gate columns, then up); a shared expert."""
    return [Entry(hf + "router.weight", ours + "router.weight"),
            Entry(hf + "experts.gate_up_proj", ours + "experts.w13_E2FD", layout="in_out"),
            Entry(hf + "experts.down_proj", ours + "experts.w2_EDF", layout="in_out"),
            *_mlp_entries(hf + "shared_expert.", ours + "shared_expert.", config.shared_ffn_size, ("w13_XD", "w2_DS"))]


def _moe_entries(config: DecoderConfig, family: Family, layer: int, keys: set[str]) -> list[Entry]:
    if family.expert_layout == "gpt_oss":
        return _gpt_oss_moe_entries(f"model.layers.{layer}.mlp.", f"layers.{layer}.mlp.", keys)
    if family.expert_layout == "llama4":
        return _llama4_moe_entries(config, f"model.layers.{layer}.feed_forward.", f"layers.{layer}.mlp.")
    prefix, fused = _layer_layout(config, family, layer, keys)
    hf, ours = f"model.layers.{layer}.{prefix}.", f"layers.{layer}.mlp."
    F = config.moe_ffn_size
    entries = [Entry(hf + "gate.weight", ours + "router.weight")]
    if config.correction_bias:
        entries.append(Entry(hf + family.correction_bias_name, ours + "router.correction_bias"))
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
        entries += _mlp_entries(f"{hf}{family.shared_prefix}.", ours + "shared_expert.", config.shared_ffn_size,
                                ("w13_XD", "w2_DS"))
        if config.shared_expert_gate:
            entries.append(Entry(hf + "shared_expert_gate.weight", ours + "shared_expert.gate_weight"))
    return entries


_RANDOM_INITS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_")


@contextlib.contextmanager
def _no_random_init():
    """``torch.nn.init``'s random fills as no-ops while a model is built on the meta device (as ``transformers``'
    ``no_init_weights``): the checkpoint overwrites every value, and a meta ``normal_`` goes through
    ``torch._refs``, whose first use imports ``torch._dynamo``, 2 s of start-up."""
    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}
    try:
        for name in _RANDOM_INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _build(config: DecoderConfig, dtype: torch.dtype, quant: Quant | None, device: torch.device) -> MoEDecoder:
    """The model with uninitialised storage on ``device``, in ``dtype``: built and cast on the meta device (FP8
    experts keep their e4m3 and fp32 tensors), then allocated once where it runs. The MoE layers' backend
    follows the device: the torch one on the CPU, the auto choice (Triton where present) on CUDA."""
    config.moe_backend = Backend.AUTO if device.type == "cuda" else Backend.TORCH
    with torch.device("meta"), _no_random_init():
        model = MoEDecoder(config)
        if quant is not None:
            quantize_fp8(model, quant.scheme)
        model = model.to(dtype)
        for module in model.modules():  # selection by the corrected scores stays fp32, as transformers keeps it
            if isinstance(module, Router) and module.correction_bias is not None:
                module.correction_bias = module.correction_bias.float()
            if isinstance(module, Indexer):  # DSA's head weights stay fp32 (transformers' _keep_in_fp32_modules)
                module.weights_proj.float()
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty re-creates parameters one module at a time
        model.lm_head.weight = model.embed_tokens.weight
    model.init_buffers()
    return model.eval().requires_grad_(False)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, hypermoe: bool | None = None,
               quantization: str | Quant | None = None, device: torch.device | str = "cpu") -> MoEDecoder:
    """Build and fill a :class:`MoEDecoder` from a HF directory; raises ``ValueError`` naming any bad key.

    ``device``: where the model is built; every checkpoint tensor is read straight onto it (safetensors to the
    device, no host copy of the model).

    ``hypermoe``: None serves what the checkpoint is; True/False insist that it is / is not a HyperMoE one.
    ``quantization`` (``"fp8-block"``, ``"fp8-channel"``): FP8 routed experts, quantised while loading from a
    high-precision checkpoint. None serves what the checkpoint is: FP8 experts for an FP8 checkpoint (DeepSeek-V3
    / ``transformers`` format: e4m3 tensors with ``<key>_scale_inv`` 128x128 block scales), copied bit-exactly.
    Its other FP8 tensors (attention, shared experts, dense MLPs) are dequantised to ``dtype``; routers and
    shared-expert gates are always high precision."""
    path = Path(path)
    hf, family, config = read_config(path)
    if hypermoe is not None and hypermoe != (config.hypermoe is not None):
        raise ValueError(f"hypermoe ({hypermoe}) but checkpoint {path} is {'' if config.hypermoe else 'not '}a "
                         "HyperMoE checkpoint (config.json key 'hypermoe')")
    device = torch.device(device)
    model = _build(config, dtype, _resolve_quant(quantization, checkpoint_quant(hf), path), device)
    targets = _targets(model)
    filled = dict.fromkeys(targets, 0)
    with contextlib.ExitStack() as stack:
        handles = {}
        for file in _files(path):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device=str(device)))
            handles.update(dict.fromkeys(handle.keys(), handle))
        prefix, ignored = family.text_model or ("", ())
        entries = [dataclasses.replace(e, hf_key=prefix + e.hf_key)
                   for e in tensor_map(config, family, {k.removeprefix(prefix) for k in handles})]
        for entry in entries:
            _load_entry(model, targets, filled, handles, entry, path)
        used = {e.hf_key for e in entries} | {key for e in entries for key in e.companion_keys()}
        other_models = {k for k in handles if k.startswith(ignored)} if ignored else set()
        if other_models:
            log.info("serving the text model of %s: skipping %d tensors of %s", config.architecture,
                     len(other_models), ", ".join(p.rstrip(".") for p in ignored))
        used |= other_models
        mtp = mtp_keys(config, handles)
        if mtp:
            log.info("skipping %d tensors of the multi-token-prediction layers %d..%d (num_nextn_predict_layers): "
                     "they serve speculative decoding, which this engine does not run", len(mtp), config.num_layers,
                     config.num_layers + config.num_mtp_layers - 1)
        unused = sorted(k for k in handles if k not in used and k not in mtp and not k.endswith(IGNORED_SUFFIXES))
    if unused:  # a config field the parser missed (a shared expert, a bias) would be served without its weights
        raise ValueError(f"checkpoint {path} has {len(unused)} tensors the model does not use, e.g. {unused[:3]}")
    for name, count in filled.items():
        if count != targets[name].numel():  # a bug in tensor_map, not in the checkpoint
            raise ValueError(f"parameter {name!r} filled {count} of {targets[name].numel()} elements")
    return model


def mtp_keys(config: DecoderConfig, keys) -> set[str]:
    """The keys of DeepSeek's multi-token-prediction layers: ``model.layers.{i}.*`` for ``num_layers <= i <
    num_layers + num_mtp_layers`` (recognised and skipped; any later layer stays an unknown tensor)."""
    layers = range(config.num_layers, config.num_layers + config.num_mtp_layers)
    return {k for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m.group(1)) in layers}


def _targets(model: MoEDecoder) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint fills: the parameters, the FP8 experts' e4m3 weights and scales, and the
    routers' correction biases."""
    targets = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        if isinstance(module, Fp8Experts):
            targets.update((f"{prefix}.{name}", buf) for name, buf in module.named_buffers())
        if isinstance(module, Router) and module.correction_bias is not None:
            targets[f"{prefix}.correction_bias"] = module.correction_bias
    return targets


def _load_entry(model: MoEDecoder, targets: dict, filled: dict, handles: dict, entry: Entry, path: Path) -> None:
    """Copy one checkpoint tensor into its slice: quantised into FP8 experts, dequantised elsewhere."""
    key = entry.hf_key
    if key not in handles:
        raise ValueError(f"checkpoint {path} is missing tensor {key!r}")
    target = targets[entry.param][entry.index]
    if entry.layout:  # stored otherwise: converted, then checked
        tensor, scale_inv = _converted(entry, handles, path), None
        shape = tuple(tensor.shape)
        if shape != tuple(target.shape):
            raise ValueError(f"tensor {key!r} gives shape {shape} as {entry.layout!r}, expected {tuple(target.shape)}")
    else:
        shape = tuple(handles[key].get_slice(key).get_shape())
        if shape != tuple(target.shape):
            raise ValueError(f"tensor {key!r} has shape {shape}, expected {tuple(target.shape)}")
        tensor = handles[key].get_tensor(key)
        scale_key = key + SCALE_SUFFIX
        scale_inv = handles[scale_key].get_tensor(scale_key) if scale_key in handles else None
        if (tensor.dtype == FP8) != (scale_inv is not None):
            raise ValueError(f"tensor {key!r} is {tensor.dtype} but checkpoint {path} "
                             f"{'has no' if scale_inv is None else 'has a'} {scale_key!r}")
    owner_name, _, name = entry.param.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(owner, Fp8Experts) and name in Fp8Experts.SCALES:  # its weights (its biases stay as they are)
        try:
            if scale_inv is None:
                owner.load_weight(name, entry.index, tensor)
            else:
                owner.load_fp8(name, entry.index, tensor, scale_inv)
        except ValueError as err:
            raise ValueError(f"tensor {key!r}: {err}") from None
        scale_name = f"{owner_name}.{Fp8Experts.SCALES[name]}"
        filled[scale_name] += targets[scale_name][owner.scale_index(name, entry.index)].numel()
    elif scale_inv is not None:
        grid = (*shape[:-2], -(-shape[-2] // BLOCK), -(-shape[-1] // BLOCK))
        if tuple(scale_inv.shape) != grid:
            raise ValueError(f"tensor {scale_key!r} has shape {tuple(scale_inv.shape)}, expected {grid}")
        target.copy_(dequantize_weight(tensor, scale_inv.float(), BLOCK))
    else:
        target.copy_(tensor)
    filled[entry.param] += target.numel()


def _converted(entry: Entry, handles: dict, path: Path) -> torch.Tensor:
    """The tensor of an entry with a ``layout``, in ours (an MXFP4 one dequantised from its blocks and scales)."""
    tensors = []
    keys = (entry.hf_key, *entry.companion_keys()) if entry.layout.startswith("mxfp4") else (entry.hf_key,)
    for key in keys:
        if key not in handles:
            raise ValueError(f"checkpoint {path} is missing tensor {key!r}")
        tensors.append(handles[key].get_tensor(key))
    try:
        return LAYOUTS[entry.layout][0](*tensors)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"tensor {entry.hf_key!r} ({entry.layout}): {err}") from None


def save_safetensors(model: MoEDecoder, family: Family, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write ``model.safetensors`` with the per-expert key names ``transformers`` uses for ``family``.

    ``fp8-block`` experts are written as they are, e4m3 with ``<key>_scale_inv`` (add :data:`QUANTIZATION_CONFIG`
    to ``config.json`` as ``quantization_config``); ``dtype`` applies to the other tensors."""
    targets = _targets(model)
    tensors = {}
    for entry in tensor_map(model.config, family):
        owner_name, _, name = entry.param.rpartition(".")
        owner = model.get_submodule(owner_name)
        t = targets[entry.param].detach()[entry.index]
        if not (isinstance(owner, Fp8Experts) and name in Fp8Experts.SCALES):  # (FP8 experts' biases: as they are)
            to_disk = LAYOUTS[entry.layout][1] if entry.layout else (lambda x: x)
            tensors[entry.hf_key] = to_disk(t.to(dtype or t.dtype)).contiguous()
            continue
        if entry.layout:
            raise ValueError(f"{owner_name}: FP8 experts of a checkpoint stored as {entry.layout!r} are not written")
        if owner.block is None:
            raise ValueError(f"{owner_name} is {owner.config.quant.value!r}: only 'fp8-block' experts have a "
                             "checkpoint format (DeepSeek-V3 weight_scale_inv)")
        scales = targets[f"{owner_name}.{Fp8Experts.SCALES[name]}"][owner.scale_index(name, entry.index)]
        tensors[entry.hf_key] = t.contiguous()
        tensors[entry.hf_key + SCALE_SUFFIX] = scales.contiguous()
    save_file(tensors, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
