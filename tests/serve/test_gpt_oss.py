"""gpt-oss in the engine beyond greedy parity (``test_parity``): its released MXFP4 expert format, dequantised at
load (to the serving dtype, or to FP8 experts when asked), and how ``layer_types`` becomes attention windows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from quant import Fp8Experts
from serve import LLM, SamplingParams
from serve.models import ARCHITECTURES
from serve.models.checkpoint_layouts import quantize_mxfp4
from serve.models.config import AttentionWindow
from serve.models.layers import DenseCausalAttention
from serve.models.loader import load_model, save_safetensors
from tests.serve.checkpoints import hf_model, save

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 40)), [5, 9, 2], list(range(60, 20, -1))]  # two longer than the window (12)


def _mxfp4_checkpoint(tmp_path):
    """A tiny gpt-oss saved as released: experts as MXFP4 ``_blocks`` / ``_scales`` ([E, out, in / 32, 16] and
    [E, out, in / 32]), ``quantization_config`` mxfp4. Returns (its dir, transformers' model with the experts as
    ``transformers``' own MXFP4 dequantisation gives them)."""
    model = hf_model("gpt_oss", intermediate_size=64)  # in-dims 64 (gate_up) and 64 (down): two groups of 32
    path = tmp_path / "mxfp4"
    save(model, path)
    state = load_file(str(path / "model.safetensors"))
    for layer in range(model.config.num_hidden_layers):
        experts = model.model.layers[layer].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            blocks, scales = quantize_mxfp4(state.pop(key).transpose(1, 2))  # stored [E, out, in]
            state[key + "_blocks"], state[key + "_scales"] = blocks, scales
            with torch.no_grad():  # transformers' dequantisation, [E, in, out]
                getattr(experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                         "model.layers.*.mlp.router"]}
    (path / "config.json").write_text(json.dumps(config))
    return path, model


def _generate(model, prompts):
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


def test_mxfp4_checkpoint_matches_transformers_on_its_dequantised_weights(tmp_path):
    path, reference = _mxfp4_checkpoint(tmp_path)
    outputs = LLM(str(path), block_size=8, max_num_batched_tokens=16, max_num_seqs=4).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == _generate(reference, PROMPTS)


def test_mxfp4_to_fp8_experts_equals_fp8_of_the_dequantised_checkpoint(tmp_path):
    """``quantization="fp8-block"`` on an MXFP4 checkpoint: the experts dequantised, then quantised to FP8 as any
    high-precision checkpoint's are (the same e4m3 weights and logits as from the dequantised checkpoint)."""
    path, reference = _mxfp4_checkpoint(tmp_path)
    dense = save(reference, tmp_path / "dequantised")
    ids = torch.tensor(PROMPTS[0])
    logits, models = [], []
    for source in (path, dense):
        models.append(load_model(source, quantization="fp8-block"))
        logits.append(models[-1].logits(models[-1](ids, torch.arange(len(ids)), DenseCausalAttention(1, len(ids)))))
    assert torch.equal(logits[0], logits[1])
    assert isinstance(models[0].layers[0].mlp.experts, Fp8Experts)
    x = torch.randn(7, 64)  # one MoE block in FP8 against the dequantised one (the tiny random model amplifies
    full = load_model(dense).layers[1].mlp(x)  # the per-layer error to ~30% in its logits)
    err = ((models[0].layers[1].mlp(x) - full).abs().max() / full.abs().max()).item()
    assert 0 < err < 0.1, err


def test_save_round_trip_writes_transformers_layout(tmp_path):
    """``save_safetensors`` writes gpt-oss's own layout back (interleaved gate/up, [E, in, out]), which both
    ``transformers`` and our loader read to the same model."""
    model = hf_model("gpt_oss")
    path = tmp_path / "hf"
    save(model, path)
    ours = load_model(path)
    out = tmp_path / "ours"
    out.mkdir()
    save_safetensors(ours, ARCHITECTURES["GptOssForCausalLM"], out)
    theirs, written = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert written.keys() == theirs.keys()
    assert all(torch.equal(written[k], theirs[k]) for k in theirs)


def test_layer_types_become_windows_and_bad_ones_are_refused(tmp_path):
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    path = save(hf_model("gpt_oss", num_hidden_layers=3, layer_types=types), tmp_path / "ok")
    windows = load_model(path).config.attention_windows
    assert windows == (AttentionWindow(sliding=12), AttentionWindow(), AttentionWindow(sliding=12))
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    for field, value, message in (("layer_types", ["sliding_attention", "local", "full_attention"], "layer_types"),
                                  ("sliding_window", None, "sliding_window")):
        (tmp_path / field).mkdir()
        (tmp_path / field / "config.json").write_text(json.dumps({**config, field: value}))
        (tmp_path / field / "model.safetensors").symlink_to(tmp_path / "ok" / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path / field)


def test_fp8_experts_of_a_converted_layout_are_not_written(tmp_path):
    """gpt-oss's FP8 experts have no checkpoint format of ours to go back to: a clear error, not a wrong file."""
    path = tmp_path / "hf"
    save(hf_model("gpt_oss"), path)
    out = tmp_path / "fp8"
    out.mkdir()
    with pytest.raises(ValueError, match="stored as 'gate_up_in_out' are not written"):
        save_safetensors(load_model(path, quantization="fp8-block"), ARCHITECTURES["GptOssForCausalLM"], out)
