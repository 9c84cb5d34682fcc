"""The DeepSeek-V3 families (multi-head latent attention, grouped sigmoid/softmax routers, shared experts, leading
dense layers; DeepSeek-V3.2 and GLM-5 with DeepSeek Sparse Attention) served token-for-token as ``transformers``
generates them, on tiny random checkpoints: through chunked prefill next to decodes, the prefix cache and forced
preemption, with the torch backend and the default one (``auto``: the C decode kernel on an fp32 CPU); their
checkpoints' FP8 tensors, multi-token-prediction layers and refused variants (indexer fields of a dense
architecture or out of range, other routers, RoPE types) at load."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant import Fp8Experts
from serve import LLM
from serve.models.loader import load_model, read_config
from tests.serve.checkpoints import DSA_FAMILIES, MLA_FAMILIES, hf_model, save
from tests.serve.test_fp8_loader import dequantized_checkpoint, fp8_checkpoint
from tests.serve.test_parity import GREEDY, _prompts, _reference


@pytest.fixture(scope="module", params=MLA_FAMILIES)
def checkpoint(request, tmp_path_factory):
    model = hf_model(request.param)
    path = save(model, tmp_path_factory.mktemp(request.param))
    return request.param, path, _reference(model, _prompts())


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_greedy_matches_transformers_with_prefix_cache(checkpoint, backend):
    """48 tokens a step: the 43- and 60-token prompts are chunked, the second chunk over the cached first one,
    while the short prompts already decode; the second pass takes the 40-token shared prefix from the cache."""
    family, path, expected = checkpoint
    indexer = read_config(path)[2].mla.indexer
    if indexer is not None:  # DSA: every prompt but the one-token one is longer than the indexer's top-k
        assert sorted(map(len, _prompts()))[1] > indexer.topk
    llm = LLM(path, block_size=8, max_num_batched_tokens=48, max_num_seqs=4, attention_backend=backend)
    assert [o.token_ids for o in llm.generate(_prompts(), GREEDY)] == expected, family
    hits = llm.engine.blocks.stats.hit_tokens
    assert [o.token_ids for o in llm.generate(_prompts(), GREEDY)] == expected, family
    assert llm.engine.blocks.stats.hit_tokens - hits >= 40 * 3
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_greedy_matches_under_preemption(checkpoint, backend):
    family, path, expected = checkpoint
    # 24 blocks of 8 slots cannot hold six sequences of ~100 tokens: sequences get preempted and recomputed
    llm = LLM(path, block_size=8, num_kv_blocks=24, max_model_len=128, max_num_batched_tokens=32, max_num_seqs=6,
              attention_backend=backend)
    outputs = llm.generate(_prompts(), GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == expected, family
    assert llm.engine.blocks.num_free_blocks == 24


def test_config_and_modules_follow_the_checkpoint(checkpoint):
    family, path, _ = checkpoint
    _, _, config = read_config(path)
    model = load_model(path)
    assert config.mla is not None and type(model.layers[0].self_attn).__name__ == "MLAAttention"
    expected_dense = {"deepseek_v3": (0,), "deepseek_v3_yarn": (), "glm4_moe_lite": (1,), "mistral4": (0,),
                      "deepseek_v32": (0,), "glm_moe_dsa": (0,)}
    assert config.dense_layers == expected_dense[family]
    indexers = [layer.self_attn.indexer is not None for layer in model.layers]
    assert indexers == {"deepseek_v32": [True, True], "glm_moe_dsa": [True, False, True]}.get(family, [False] * 2)
    if family in DSA_FAMILIES:  # GLM-5's indexer ropes interleaved pairs, DeepSeek-V3.2's halves
        assert config.mla.indexer.rope_interleave == (family == "glm_moe_dsa") and config.mla.rope_interleave
        assert model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    assert (config.yarn is not None) == (family in ("deepseek_v3_yarn", "mistral4"))
    assert hasattr(model.layers[0].self_attn, "q_proj") == (family == "deepseek_v3_yarn")
    moe = next(layer.mlp for layer in model.layers if hasattr(layer.mlp, "router"))
    state = load_file(f"{path}/model.safetensors")
    i = next(i for i, layer in enumerate(model.layers) if layer.mlp is moe)
    if family != "mistral4":  # DeepSeek's correction bias, loaded (Mistral 4's softmax router has none)
        assert torch.equal(moe.router.correction_bias, state[f"model.layers.{i}.mlp.gate.e_score_correction_bias"])
    else:
        assert moe.router.correction_bias is None


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    model = hf_model("deepseek_v3", seed=3)
    return model, save(model, tmp_path_factory.mktemp("deepseek_v3"))


def _edit(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        state = load_file(str(dst / "model.safetensors"))
        save_file(tensors(state), str(dst / "model.safetensors"))
    return dst


def test_multi_token_prediction_layer_is_skipped_not_unknown(deepseek_dir, tmp_path, caplog):
    """DeepSeek-V3 stores its MTP module as layer ``num_hidden_layers`` (config ``num_nextn_predict_layers``):
    skipped with a log line; a tensor of a layer past it is still reported as unused."""
    model, path = deepseek_dir

    def add_layers(state):
        layer1 = {k: v for k, v in state.items() if k.startswith("model.layers.1.")}
        mtp = {k.replace("layers.1.", "layers.2."): v.clone() for k, v in layer1.items()}
        mtp |= {"model.layers.2.eh_proj.weight": torch.randn(64, 128), "model.layers.2.enorm.weight": torch.ones(64)}
        return state | mtp

    mtp_dir = _edit(path, tmp_path / "mtp", {"num_nextn_predict_layers": 1}, add_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tensors the model does not use"
        with caplog.at_level("INFO", logger="moe-serve"):
            served = load_model(mtp_dir)
    assert "multi-token-prediction layers 2..2" in caplog.text
    assert served.config.num_mtp_layers == 1 and len(served.layers) == 2
    extra_dir = _edit(mtp_dir, tmp_path / "extra", tensors=lambda s: s | {"model.layers.3.foo.weight": torch.ones(2)})
    with pytest.raises(ValueError, match=r"1 tensors the model does not use.*model\.layers\.3\.foo\.weight"):
        load_model(extra_dir)


def test_fp8_checkpoint_attention_and_dense_weights_dequantised(deepseek_dir, tmp_path):
    """DeepSeek-V3's FP8 format: every linear weight (attention's LoRA projections and kv_b_proj, the dense layer,
    shared and routed experts) e4m3 with ``weight_scale_inv``. Routed experts stay FP8; everything else is
    dequantised to the serving dtype at load, so the model equals its dequantised checkpoint."""
    _, path = deepseek_dir
    fp8 = fp8_checkpoint(Path(path), tmp_path / "fp8")
    state = load_file(str(fp8 / "model.safetensors"))
    assert state["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.mlp.gate_proj.weight_scale_inv" in state
    model, reference = load_model(fp8), load_model(dequantized_checkpoint(fp8, tmp_path / "deq"))
    assert isinstance(model.layers[1].mlp.experts, Fp8Experts)
    kv_b = model.layers[0].self_attn.kv_b_proj.weight
    assert kv_b.dtype == torch.float32 and torch.equal(kv_b, reference.layers[0].self_attn.kv_b_proj.weight)
    prompts = _prompts(seed=4)[:3]
    got = LLM(str(fp8), block_size=8).generate(prompts, GREEDY)
    want = LLM(str(tmp_path / "deq"), block_size=8).generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


V32 = {"architectures": ["DeepseekV32ForCausalLM"]}
DSA = {"index_topk": 8, "index_n_heads": 4, "index_head_dim": 16}


@pytest.mark.parametrize("change, message", [
    ({"index_n_heads": 64}, r"^index_n_heads \(64\): DeepSeek Sparse Attention.*not DeepseekV3ForCausalLM"),
    ({**V32, "index_topk": 2048, "index_head_dim": 16}, r"^config\.json has no index_n_heads$"),
    ({**V32, **DSA, "index_head_dim": 4}, r"^index_head_dim \(4\) must be >= qk_rope_head_dim \(8\)"),
    ({**V32, **DSA, "index_topk": 0}, r"^index_topk \(0\) must be a positive integer"),
    ({**V32, **DSA, "q_lora_rank": None}, r"^q_lora_rank \(None\): DeepSeek Sparse Attention"),
    ({"architectures": ["GlmMoeDsaForCausalLM"], **DSA, "indexer_types": ["full", "dense"]},
     r"^indexer_types \(\['full', 'dense'\]\) must list 'full' or 'shared'"),
    ({"architectures": ["GlmMoeDsaForCausalLM"], **DSA, "indexer_types": ["shared", "full"]},
     r"^indexer_types\[0\] \('shared'\) must be 'full'"),
    ({"scoring_func": "softmax"}, r"^scoring_func \('softmax'\) is not supported"),
    ({"topk_method": "group_limited_greedy"}, r"^topk_method \('group_limited_greedy'\) is not supported"),
    ({"moe_layer_freq": 2}, r"^moe_layer_freq \(2\) is not supported"),
    ({"hidden_act": "gelu"}, r"^hidden_act \('gelu'\) is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     r"^rope_parameters\.rope_type \('dynamic'\)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     r"^rope_parameters\.partial_rotary_factor \(0\.5\)"),
])
def test_unsupported_variants_fail_in_one_line_naming_the_field(deepseek_dir, tmp_path, change, message):
    _, path = deepseek_dir
    bad = _edit(path, tmp_path / "bad", change)
    with pytest.raises(ValueError, match=message) as err:
        LLM(str(bad))
    assert "\n" not in str(err.value)
