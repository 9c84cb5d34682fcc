"""Greedy generation through the engine (paged cache, continuous batching, chunked prefill, prefix caching,
preemption) is token-for-token identical to ``transformers``' ``generate`` on tiny random checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve import LLM, SamplingParams
from tests.serve.checkpoints import FAMILIES, hf_config, hf_model, save

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def _prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 128, (40,), generator=g).tolist()  # a "system prompt" 5 blocks of 8 long
    own = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 17, 1, 9, 60)]
    return [shared + own[0], shared + own[1], own[2], own[3], own[4], shared + own[0][:2]]


def _reference(model, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    for p in prompts:  # one at a time: no padding in the reference
        ids = model.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    model = hf_model(request.param)
    path = save(model, tmp_path_factory.mktemp(request.param))
    return request.param, model, path, _reference(model, _prompts())


def test_greedy_matches_transformers(checkpoint):
    family, _, path, expected = checkpoint
    llm = LLM(path, block_size=8, max_num_batched_tokens=48, max_num_seqs=4)
    outputs = llm.generate(_prompts(), GREEDY)
    assert [o.token_ids for o in outputs] == expected, family
    # the same prompts again: shared blocks now come from the prefix cache and skip their prefill
    hits_before = llm.engine.blocks.stats.hit_tokens
    prompt_tokens_before = llm.engine.stats.prompt_tokens
    again = llm.generate(_prompts(), GREEDY)
    assert [o.token_ids for o in again] == expected, family
    assert llm.engine.blocks.stats.hit_tokens - hits_before >= 40 * 3
    assert llm.engine.stats.prompt_tokens - prompt_tokens_before <= sum(map(len, _prompts())) - 40 * 3
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_greedy_matches_under_preemption(checkpoint):
    family, _, path, expected = checkpoint
    # 24 blocks of 8 slots cannot hold six sequences of ~100 tokens: sequences get preempted and recomputed. A model
    # sliding on every layer returns blocks as it goes (see below): 12 blocks for it, the fewest a 96-token one needs
    blocks, max_len = (12, 96) if family == "mixtral_sliding" else (24, 128)
    llm = LLM(path, block_size=8, num_kv_blocks=blocks, max_model_len=max_len, max_num_batched_tokens=32,
              max_num_seqs=6, enable_prefix_caching=family != "olmoe")
    outputs = llm.generate(_prompts(), GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == expected, family
    assert llm.engine.blocks.num_free_blocks == blocks


@pytest.mark.parametrize("family", ["mixtral_sliding", "mixtral"])
def test_blocks_every_window_passed_are_returned_while_running(family, tmp_path):
    """Every layer slides by 13 keys: a running sequence holds the blocks of its last ~13 keys (plus the block
    being filled), not of its whole context, so six ~100-token sequences fit 24 blocks of 8 without preemption,
    still token-identical to ``generate`` and the prefix cache still serving the shared prompt; the same sequences
    under full attention (plain Mixtral) do not fit."""
    model = hf_model(family)
    path = save(model, tmp_path)
    expected = _reference(model, _prompts())
    llm = LLM(path, block_size=8, num_kv_blocks=24, max_model_len=128, max_num_batched_tokens=32, max_num_seqs=6)
    engine, peak = llm.engine, 0
    for run in range(2):  # the second run: the shared prompt's blocks from the prefix cache
        hits_before = engine.blocks.stats.hit_tokens
        for i, prompt in enumerate(_prompts()):
            engine.add_request(f"{run}-{i}", prompt, GREEDY)
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update((o.request_id, o) for o in engine.step() if o.finished)
            held = [len(s.block_table) - s.num_released for s in engine.scheduler.running]
            peak = max([peak, *held])
        assert [outputs[f"{run}-{i}"].token_ids for i in range(6)] == expected
        assert engine.blocks.num_free_blocks == 24
    if family == "mixtral":
        assert engine.scheduler.num_preemptions > 0 and peak > 5
        return
    assert engine.scheduler.num_preemptions == 0
    # held after a step: keys first_key(start) .. start + 31 of its last chunk, 12 + 32 keys, at most 7 blocks of 8
    # (a ~100-token sequence under full attention: 12 blocks)
    assert peak <= 7
    assert engine.blocks.stats.hit_tokens - hits_before >= 40  # a returned block is still a cached prefix


def test_sharded_checkpoint(tmp_path):
    model = hf_model("qwen3_moe", seed=3)
    path = save(model, tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    prompts = _prompts(seed=2)[:3]
    outputs = LLM(path, block_size=8).generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == _reference(model, prompts)


def test_fused_expert_keys_and_tied_embeddings(tmp_path):
    """A checkpoint in transformers-5's in-memory layout (``experts.gate_up_proj`` [E, 2F, D],
    ``experts.down_proj`` [E, D, F]) loads to the same model; tied embeddings need no ``lm_head``."""
    model = hf_model("mixtral", seed=4, tie_word_embeddings=True)
    model.tie_weights()
    path = save(model, tmp_path / "per_expert")
    state = load_file(f"{path}/model.safetensors")
    assert "lm_head.weight" not in state and "model.layers.0.block_sparse_moe.experts.3.w1.weight" in state
    fused = {}
    for key, value in state.items():
        if ".experts." not in key:
            fused[key.replace("block_sparse_moe", "mlp")] = value
    for layer in range(2):
        pre = f"model.layers.{layer}.block_sparse_moe.experts"
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([state[f"{pre}.{e}.w1.weight"], state[f"{pre}.{e}.w3.weight"]]) for e in range(8)])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [state[f"{pre}.{e}.w2.weight"] for e in range(8)])
    (tmp_path / "fused").mkdir()
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"))
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    prompts = _prompts(seed=5)[2:5]
    expected = _reference(model, prompts)
    for variant in ("per_expert", "fused"):
        outputs = LLM(str(tmp_path / variant), block_size=8).generate(prompts, GREEDY)
        assert [o.token_ids for o in outputs] == expected, variant


def test_missing_config_fields_take_transformers_defaults(tmp_path):
    """A Qwen2-MoE config.json without ``shared_expert_intermediate_size`` has the shared expert transformers gives
    it by default (5632 wide), as ``generate`` does; the tensors of a part the model lacks are an error."""
    import transformers as tf

    default_shared = tf.Qwen2MoeConfig().shared_expert_intermediate_size
    model = hf_model("qwen2_moe", shared_expert_intermediate_size=default_shared)
    path = save(model, tmp_path / "defaults")
    config_path = tmp_path / "defaults" / "config.json"
    config = json.loads(config_path.read_text())
    del config["shared_expert_intermediate_size"]
    config_path.write_text(json.dumps(config))
    prompts = _prompts()[:4]
    reference = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    assert reference.config.shared_expert_intermediate_size == default_shared
    llm = LLM(path, block_size=8, max_num_seqs=4)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == _reference(reference, prompts)

    config["shared_expert_intermediate_size"] = 0  # said explicitly: no shared expert, yet the checkpoint has one
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tensors the model does not use.*shared_expert"):
        LLM(path, block_size=8)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
], ids=lambda r: r["rope_type"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_rope_scaling_matches_transformers(rope, family, tmp_path):
    """Linear, Llama 3 and YaRN scaling on a Llama-attention family (Qwen3-MoE: q/k norms) and on an MLA one
    (DeepSeek-V3, with ``mscale_all_dim`` scaling its softmax as transformers' ``yarn_apply_mscale`` does for every
    non-default type), prompts past the original context."""
    rope = {**rope, "mscale_all_dim": 0.7} if family == "deepseek_v3" else rope
    model = hf_model(family, rope_parameters=rope)
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    path = save(model, tmp_path / rope["rope_type"])
    prompts = _prompts()[:5]
    llm = LLM(path, block_size=8, max_num_seqs=4)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == _reference(model, prompts)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_partial_rotary_factor_is_ignored_where_transformers_ignores_it(family, tmp_path):
    """Mixtral's and Qwen3-MoE's rotary embeddings in ``transformers`` 5.24 rotate all of head_dim whatever
    ``partial_rotary_factor`` says (only GLM-4.5 and MiniMax-M2 among the served families read it), and so does
    the engine."""
    rope = {**hf_config(family).rope_parameters, "partial_rotary_factor": 0.5}
    model = hf_model(family, rope_parameters=rope)
    path = save(model, tmp_path / family)
    prompts = _prompts()[:4]
    llm = LLM(path, block_size=8, max_num_seqs=4)
    assert llm.engine.model.config.rotary_dim in (0, model.config.head_dim)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == _reference(model, prompts)
