"""Llama 4 in the engine beyond greedy parity (``test_parity``): a multimodal ``Llama4ForConditionalGeneration``
checkpoint serves its text model, and ``config.json`` fields that do not fit are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from serve import LLM, SamplingParams
from serve.models.config import AttentionWindow, QKNorm
from serve.models.loader import load_model, read_config
from tests.serve.checkpoints import hf_config, hf_model, save

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(5, 45)), [7, 3], list(range(100, 70, -1))]  # two longer than the attention chunk (16)


def _generate(model, prompts):
    out = []
    for p in prompts:
        ids = model.generate(input_ids=torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


def test_conditional_generation_checkpoint_serves_its_text_model(tmp_path):
    """``language_model.*`` keys and ``text_config``; the vision tower and projector are skipped; greedy output
    equals ``generate`` of the multimodal model's language model (its own ``forward`` fails on text-only input in
    transformers 5.24: ``MoeCausalLMOutputWithPast`` has no ``image_outputs``)."""
    text = hf_model("llama4").config.to_dict()
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=64)
    torch.manual_seed(0)
    model = tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=text, vision_config=vision)).eval()
    model.language_model.load_state_dict(hf_model("llama4").state_dict())
    path = save(model, tmp_path)
    config = read_config(path)[2]
    assert config.architecture == "Llama4ForConditionalGeneration" and config.nope_layers == (1,)
    outputs = LLM(path, block_size=8, max_num_batched_tokens=24, max_num_seqs=4).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == _generate(model.language_model, PROMPTS)


def test_config_fields_become_layers_and_bad_ones_are_refused(tmp_path):
    path = save(hf_model("llama4"), tmp_path / "ok")
    config = load_model(path).config
    assert config.attention_windows == (AttentionWindow(chunk=16), AttentionWindow(), AttentionWindow(chunk=16))
    assert config.dense_layers == (0, 2) and config.qk_norm is QKNorm.L2 and config.attn_temperature == (8.0, 0.1)
    raw = json.loads((tmp_path / "ok" / "config.json").read_text())
    for name, value, message in (("no_rope_layers", [1, 0], "no_rope_layers"),
                                 ("hidden_act", "gelu", "hidden_act")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**raw, name: value}))
        with pytest.raises(ValueError, match=message):
            read_config(tmp_path / name)


def test_layer_types_default_as_transformers_derives_them():
    """Without ``layer_types`` (an older config.json), the roped layers are chunked, as ``transformers`` says."""
    from serve.models.registry import parse_llama4

    raw = hf_config("llama4").to_dict()
    raw.pop("layer_types")
    raw["architectures"] = ["Llama4ForCausalLM"]
    windows = parse_llama4(raw).attention_windows
    assert windows == tuple(AttentionWindow(chunk=16) if r else AttentionWindow() for r in raw["no_rope_layers"])
