"""The serving loader and FP8: (a) DeepSeek-V3 / ``transformers`` FP8 checkpoints (e4m3 tensors with
``<key>_scale_inv`` 128x128 block scales, ``quantization_config`` in config.json), built here by quantising tiny
``transformers``-saved models; (b) quantising a high-precision checkpoint while loading."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import serve
from moe import MoEConfig
from quant import Fp8Experts, quantize_fp8
from quant.fp8 import FP8, dequantize_weight, quantize_weight
from serve.models import ARCHITECTURES
from serve.models.layers import DenseCausalAttention
from serve.models.loader import QUANTIZATION_CONFIG, load_model, save_safetensors
from tests.serve.checkpoints import hf_model, save

# What DeepSeek-V3's config.json carries (written out here, not taken from the loader)
DEEPSEEK_V3_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]}
HIGH_PRECISION = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "block_sparse_moe.gate.", "shared_expert_gate")


def fp8_checkpoint(src, dst, block_size=(128, 128)):
    """``src`` (a saved HF model) in DeepSeek-V3's FP8 format: every linear weight but embeddings, norms, routers
    and the shared-expert gate as e4m3 + ``<key>_scale_inv`` (what DeepSeek-V3 quantises: attention included)."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    out = {}
    for key, t in state.items():
        if t.dim() == 2 and key.endswith(".weight") and not any(p in key for p in HIGH_PRECISION):
            out[key], out[key + "_scale_inv"] = quantize_weight(t, "block")
        else:
            out[key] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {**DEEPSEEK_V3_QUANTIZATION, "weight_block_size": list(block_size)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def dequantized_checkpoint(src, dst):
    """``src`` (an FP8 checkpoint) with every FP8 tensor dequantised to fp32: the model FP8 serving must equal."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    out = {k: dequantize_weight(t, state[k + "_scale_inv"], 128) if t.dtype == FP8 else t
           for k, t in state.items() if not k.endswith("_scale_inv")}
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids, torch.arange(len(ids)), DenseCausalAttention(1, len(ids))))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# qwen3_moe: D=64, F=48 (ragged: one partial block), layer 1 dense; qwen2_moe: shared expert with a gate;
# mixtral: w1/w3/w2 names; a wide qwen3_moe: F=200, D=192 (several ragged blocks per matrix)
CASES = {"qwen3_moe": {}, "qwen2_moe": {}, "mixtral": {},
         "qwen3_wide": dict(hidden_size=192, moe_intermediate_size=200, intermediate_size=136)}


@pytest.fixture(scope="module", params=list(CASES))
def dirs(request, tmp_path_factory):
    family = "qwen3_moe" if request.param == "qwen3_wide" else request.param
    root = tmp_path_factory.mktemp(request.param)
    hf = save(hf_model(family, **CASES[request.param]), root / "hf")
    fp8 = fp8_checkpoint(root / "hf", root / "fp8")
    return family, hf, fp8, dequantized_checkpoint(fp8, root / "deq")


def test_fp8_checkpoint_loads_bit_exactly_and_equals_its_dequantised_model(dirs):
    family, _, fp8_dir, deq_dir = dirs
    model = load_model(fp8_dir)
    reference = load_model(deq_dir)
    state = load_file(str(fp8_dir / "model.safetensors"))
    layers = [i for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "experts")]
    for i in layers:
        ex = model.layers[i].mlp.experts
        assert isinstance(ex, Fp8Experts) and ex.scheme.value == "block"
        prefix = next(k.rsplit(".experts.", 1)[0] for k in state
                      if k.startswith(f"model.layers.{i}.") and ".experts." in k)
        names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        F = ex.w2_EDF.shape[2]
        for e in range(ex.num_experts):
            for name, (buf, rows) in zip(names, (("w13_E2FD", slice(0, F)), ("w13_E2FD", slice(F, 2 * F)),
                                                 ("w2_EDF", None)), strict=True):
                index = (e,) if rows is None else (e, rows)
                key = f"{prefix}.experts.{e}.{name}.weight"
                assert torch.equal(getattr(ex, buf)[index].view(torch.uint8), state[key].view(torch.uint8)), key
                scales = getattr(ex, Fp8Experts.SCALES[buf])[ex.scale_index(buf, index)]
                assert torch.equal(scales, state[key + "_scale_inv"]), key
        router = model.layers[i].mlp.router.weight
        assert router.dtype == torch.float32 and torch.equal(router, state[f"{prefix}.gate.weight"])
    ids = torch.randint(0, model.config.vocab_size, (40,))
    assert rel(logits(model, ids), logits(reference, ids)) <= 1e-5  # same weights, fp32 math either way


def test_quantise_while_loading_equals_quantising_the_loaded_model(dirs):
    _, hf_dir, _, _ = dirs
    full = load_model(hf_dir)
    ids = torch.randint(0, full.config.vocab_size, (40,))
    expected32 = logits(full, ids)
    for scheme in ("channel", "block"):
        model = load_model(hf_dir, quantization=f"fp8-{scheme}")
        reference = quantize_fp8(load_model(hf_dir), scheme)
        for (name, got), (_, want) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
        assert rel(logits(model, ids), expected32) < 0.1  # sanity: FP8 experts stay close to fp32 (random weights)


def test_shared_expert_and_its_gate_stay_high_precision(tmp_path):
    hf_dir = tmp_path / "hf"
    save(hf_model("qwen2_moe"), hf_dir)
    state = load_file(str(hf_dir / "model.safetensors"))
    model = load_model(hf_dir, quantization="fp8-block")
    shared = model.layers[0].mlp.shared_expert
    assert shared.gate_weight.dtype == torch.float32 and shared.w13_XD.dtype == torch.float32
    assert torch.equal(shared.gate_weight, state["model.layers.0.mlp.shared_expert_gate.weight"])
    assert torch.equal(shared.w2_DS, state["model.layers.0.mlp.shared_expert.down_proj.weight"])


def test_save_writes_the_fp8_checkpoint_back(dirs, tmp_path):
    family, _, fp8_dir, _ = dirs
    model = load_model(fp8_dir)
    save_safetensors(model, ARCHITECTURES[model.config.architecture], tmp_path)
    written, original = load_file(str(tmp_path / "model.safetensors")), load_file(str(fp8_dir / "model.safetensors"))
    expert_keys = [k for k in original if ".experts." in k]
    assert expert_keys and all(k in written for k in expert_keys)
    for k in expert_keys:
        assert torch.equal(written[k].view(torch.uint8), original[k].view(torch.uint8)), k


def test_block_grid_matches_transformers_dequantisation():
    """Our scale_inv layout read by ``transformers``' own FP8 dequantiser (shapes it accepts: whole blocks)."""
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    w = torch.randn(256, 384)
    q, scale_inv = quantize_weight(w, "block")
    theirs = finegrained.Fp8Dequantize(None)._dequantize_one(q, scale_inv, output_dtype=torch.float32)
    assert torch.equal(theirs, dequantize_weight(q, scale_inv, 128))


@pytest.mark.parametrize("F, exact", [(256, True), (200, False)])
def test_fused_gate_up_grid_is_copied_when_it_is_ours(F, exact):
    """A fused [E, 2F, D] checkpoint tensor has one block grid over all 2F rows: it is this layout's (gate and up
    blocks apart) only when F is whole blocks; otherwise the loader re-quantises, and says so."""
    experts = Fp8Experts(MoEConfig(136, F, 2, 1, quant="fp8-block"))
    w13 = torch.randn(2, 2 * F, 136)
    q, scale_inv = quantize_weight(w13, "block")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        experts.load_fp8("w13_E2FD", (), q, scale_inv)
    assert bool(caught) is not exact and all("re-quantising" in str(w.message) for w in caught)
    assert torch.equal(experts.w13_E2FD.view(torch.uint8), q.view(torch.uint8)) is exact
    got = experts.dequantized()[0]
    assert ((got - dequantize_weight(q, scale_inv, 128)).norm() / w13.norm()).item() < (1e-7 if exact else 0.04)


@pytest.fixture(scope="module")
def qwen_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_fp8")
    save(hf_model("qwen3_moe"), root / "hf")
    return root / "hf", fp8_checkpoint(root / "hf", root / "fp8")


def test_quantization_must_match_an_fp8_checkpoint(qwen_fp8):
    _, fp8_dir = qwen_fp8
    assert isinstance(load_model(fp8_dir, quantization="fp8-block").layers[0].mlp.experts, Fp8Experts)
    with pytest.raises(ValueError, match=r"quantization \('fp8-channel'\) does not match checkpoint .* 'fp8-block'"):
        load_model(fp8_dir, quantization="fp8-channel")
    with pytest.raises(ValueError, match=r"quantization \('int8'\) is not one of"):
        load_model(fp8_dir, quantization="int8")


@pytest.mark.parametrize("change, match", [
    ({"weight_block_size": [64, 64]}, r"quantization_config.weight_block_size \(\[64, 64\]\) is not supported"),
    ({"quant_method": "fbgemm_fp8"}, r"quantization_config.quant_method \('fbgemm_fp8'\) is not supported"),
    ({"activation_scheme": "static"}, r"quantization_config.activation_scheme \('static'\) is not supported"),
])
def test_unsupported_quantization_config_is_named(qwen_fp8, tmp_path, change, match):
    _, fp8_dir = qwen_fp8
    path = tmp_path / "m"
    shutil.copytree(fp8_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_model(path)


@pytest.mark.parametrize("key", ["model.layers.0.mlp.experts.3.up_proj.weight",
                                 "model.layers.1.self_attn.q_proj.weight"])
def test_missing_or_misshaped_scale_inv_is_named(qwen_fp8, tmp_path, key):
    _, fp8_dir = qwen_fp8
    path = tmp_path / "m"
    shutil.copytree(fp8_dir, path)
    state = load_file(str(path / "model.safetensors"))
    scale = state.pop(key + "_scale_inv")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"tensor '{key}' is torch.float8_e4m3fn but .* no '{key}_scale_inv'"):
        load_model(path)
    state[key + "_scale_inv"] = torch.cat([scale, scale], dim=0)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{key}.*\(2, 1\)"):
        load_model(path)


def test_engine_serves_an_fp8_checkpoint(qwen_fp8, tmp_path):
    _, fp8_dir = qwen_fp8
    reference = dequantized_checkpoint(fp8_dir, tmp_path / "deq")
    sampling = serve.SamplingParams(max_tokens=12, temperature=0.0)
    prompt = [5, 17, 99, 3, 64]
    llm = serve.LLM(str(fp8_dir))
    assert isinstance(llm.engine.model.layers[0].mlp.experts, Fp8Experts)
    assert llm.engine.model.layers[0].mlp.config.quant.value == "fp8-block"
    got = llm.generate(prompt, sampling)[0].token_ids
    assert got == serve.LLM(str(reference)).generate(prompt, sampling)[0].token_ids


def test_llm_quantization_option(tmp_path):
    hf_dir = save(hf_model("qwen3_moe"), tmp_path / "hf")
    llm = serve.LLM(str(hf_dir), quantization="fp8-block")
    assert isinstance(llm.engine.model.layers[0].mlp.experts, Fp8Experts)
    assert llm.engine.model.layers[0].mlp.config.quant.value == "fp8-block"


def test_quantization_config_constant_is_deepseek_v3s():
    assert QUANTIZATION_CONFIG == DEEPSEEK_V3_QUANTIZATION
