"""Checkpoint loading fails before serving, naming the key: unknown architectures, missing or mis-shaped
tensors, unsupported RoPE; the key table round-trips through ``save_safetensors``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve.models import ARCHITECTURES
from serve.models.loader import load_model, read_config, save_safetensors
from tests.serve.checkpoints import hf_model, save


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save(hf_model("qwen3_moe"), tmp_path_factory.mktemp("qwen"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(qwen_dir, tmp_path):
    path = _copy(qwen_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"architectures \(\['GPT2LMHeadModel'\]\) is not supported.*Mixtral"):
        load_model(path)


def test_missing_tensor_named(qwen_dir, tmp_path):
    path = _copy(qwen_dir, tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.0\.mlp\.experts\.5\.up_proj\.weight'"):
        load_model(path)


def test_misshaped_tensor_named(qwen_dir, tmp_path):
    path = _copy(qwen_dir, tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(16, 64\), "
                                         r"expected \(32, 64\)"):
        load_model(path)


def test_unsupported_rope_and_missing_files(qwen_dir, tmp_path):
    path = _copy(qwen_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rope_type \('dynamic'\)"):
        read_config(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "empty")
    shutil.copy(qwen_dir + "/config.json", tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_model(tmp_path / "empty")


def test_qwen_dense_layers_and_save_round_trip(qwen_dir, tmp_path):
    model = load_model(qwen_dir)
    assert model.config.dense_layers == (1,)  # mlp_only_layers=[1]
    path = _copy(qwen_dir, tmp_path / "m")
    save_safetensors(model, ARCHITECTURES["Qwen3MoeForCausalLM"], path)
    original, saved = load_file(qwen_dir + "/model.safetensors"), load_file(str(path / "model.safetensors"))
    assert original.keys() == saved.keys()
    for key in original:
        assert torch.equal(original[key], saved[key]), key
