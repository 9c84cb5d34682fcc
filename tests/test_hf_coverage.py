"""Every MoE block class of this ``transformers`` is either read by ``moe.hf`` (block parity with the family's own
block, built from its own config) or refused by name: ``moe.hf.REFUSED_BLOCKS`` for the blocks that do not fit,
``PENDING`` below for the ones that fit but are not read yet. A new transformers block fails the first test
until it is sorted into one of the three."""

from __future__ import annotations

import ast
import functools
import importlib
import pathlib
import re

import pytest
import torch
import transformers
from transformers.integrations.heterogeneity.configuration_utils import AmbiguousGlobalPerLayerAttributeError
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import moe
from moe.hf import REFUSED_BLOCKS, supported_blocks
from tests.test_hf_parity import _rel_err

# Top-k blocks not read yet, and what each needs (their routing or expert layout is not one of moe.hf's patterns).
PENDING: dict[str, str] = {}

SHRINK = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=12, intermediate_size=64, moe_intermediate_size=40, num_experts=8, num_local_experts=8,
              n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=0, decoder_sparse_step=1, n_group=2,
              topk_group=1, moe_num_experts=8, moe_k=2, moe_topk=2, expert_intermediate_size=40,
              shared_expert_intermediate_size=56, n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1)

# Blocks that the shrunk default config does not build as they are: the sub-config a block is built from
# (``path``, instead of thinker -> text), a nested config shrunk too (``nested``), values set after SHRINK
# whether the config declares them or not (``set``), the layer index to build (``layer``: a top-k or sparse one).
BUILD = {
    # the talker block reads a shared-expert size that its config class does not declare (checkpoints pass it)
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": dict(path=("talker_config", "text_config"),
                                                 set=dict(shared_expert_intermediate_size=56)),
    "DbrxFFN": dict(nested="ffn_config", set=dict(moe_top_k=2, ffn_hidden_size=40)),
    "DeepseekV4SparseMoeBlock": dict(layer=3),  # layers 0-2 are hash-routed (refused: test below)
    "Dots3NoteVisionMoE": dict(path=("vision_config",), layer=25,  # the first sparse vision layer (4 experts)
                               set=dict(num_hidden_layers=42)),
}


@functools.cache
def moe_blocks() -> dict[str, str]:
    """``{class name: model type}`` for every transformers module class whose ``__init__`` sets ``self.experts``."""
    found = {}
    for path in sorted((pathlib.Path(transformers.__file__).parent / "models").glob("*/modeling_*.py")):
        source = path.read_text()
        if "self.experts" not in source:
            continue
        for node in ast.parse(source).body:
            init = isinstance(node, ast.ClassDef) and next(
                (f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if init and any(isinstance(t, ast.Attribute) and t.attr == "experts" and
                            isinstance(t.value, ast.Name) and t.value.id == "self"
                            for a in ast.walk(init) if isinstance(a, ast.Assign) for t in a.targets):
                found[node.name] = path.parent.name
    return found


def test_every_block_is_read_or_refused_by_name():
    found = moe_blocks()
    unsorted = sorted(set(found) - set(supported_blocks()) - set(REFUSED_BLOCKS) - set(PENDING))
    assert not unsorted, f"MoE blocks neither read nor refused: {unsorted}"
    stale = sorted(set(supported_blocks()) - set(found))
    assert not stale, f"supported_blocks() names classes this transformers does not have: {stale}"
    assert not set(PENDING) & set(supported_blocks())
    print(f"\n{len(found)} MoE blocks: {len(set(found) & set(supported_blocks()))} read, "
          f"{len(set(found) & set(REFUSED_BLOCKS))} refused as not fitting, {len(set(found) & set(PENDING))} pending")


def _shrink(config, values: dict) -> None:
    """Set the scalar attributes the config has; per-layer ones (a heterogeneous config's) are left as they are."""
    for key, value in values.items():
        try:
            current = getattr(config, key)
        except (AttributeError, AmbiguousGlobalPerLayerAttributeError):
            continue
        if not isinstance(current, (list, dict)):
            setattr(config, key, value)


def _tiny_block(cls_name: str, layer: int | None = None, **overrides) -> tuple[torch.nn.Module, int]:
    """The block built from its family's default config, shrunk (``overrides`` on top of SHRINK), with decisive
    random weights; ``layer``: the layer index for blocks that take one (else ``BUILD``'s, else 0)."""
    model_type = moe_blocks()[cls_name]
    build = BUILD.get(cls_name, {})
    config = CONFIG_MAPPING[model_type]()
    for composite in build.get("path", ("thinker_config", "text_config", "text_config")):  # Omni: thinker -> text
        config = getattr(config, composite, None) or config
    for target in (config, getattr(config, build["nested"])) if "nested" in build else (config,):
        _shrink(target, {**SHRINK, **overrides})
        for key, value in build.get("set", {}).items():
            setattr(target, key, value)
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    torch.manual_seed(0)
    try:
        block = getattr(module, cls_name)(config)
    except TypeError:  # blocks that take a layer index
        block = getattr(module, cls_name)(config, build.get("layer", 0) if layer is None else layer)
    with torch.no_grad():
        for _, p in block.named_parameters():
            p.normal_(0.0, 0.15)  # decisive routing, distinct experts; biases (correction or expert) non-zero
        for name, b in block.named_buffers():
            if "bias" in name:
                b.normal_(0.0, 0.05)
    return block.eval(), config.hidden_size


# gpt-oss and Llama 4 return (hidden, router tensor) and need their own config shapes: tests/test_hf_parity.py.
@pytest.mark.parametrize("cls_name", [c for c in supported_blocks() if c not in ("GptOssMLP", "Llama4TextMoe")])
def test_block_parity_from_its_own_config(cls_name):
    block, hidden = _tiny_block(cls_name)
    ours = moe.MoE.from_hf(block)
    x = torch.randn(1, 9, hidden)
    with torch.no_grad():
        expected, got = block(x), ours(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert _rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize(("cls_name", "overrides", "shared"), [
    ("MiniMaxM3VLSparseMoeBlock", {"swiglu_alpha": 1.2, "swiglu_limit": 0.3}, None),  # gpt-oss's GLU, shared too
    ("Glm5NextTextMoE", {"swiglu_limit": 0.3}, None),  # clamped SwiGLU, shared too
    ("HYV4MoE", {"swiglu_limit": 0.3}, "swiglu"),  # clamped SwiGLU experts beside a plain SwiGLU shared MLP
])
def test_clamped_glu_parameters_reach_routed_and_shared_experts(cls_name, overrides, shared):
    """The clamped GLUs with the config's parameters, in the routed experts and in the shared MLP as it has
    them (a small limit, so the clamps bite)."""
    block, hidden = _tiny_block(cls_name, **overrides)
    ours = moe.MoE.from_hf(block)
    assert ours.config.swiglu_limit == 0.3
    assert (ours.config.shared_activation and ours.config.shared_activation.value) == shared
    x = torch.randn(1, 9, hidden)
    with torch.no_grad():
        assert _rel_err(ours(x), block(x)) <= 1e-5


@pytest.mark.parametrize("cls_name", sorted(REFUSED_BLOCKS))
def test_refused_blocks_are_named_with_their_reason(cls_name):
    if cls_name not in moe_blocks() and cls_name != "DogeCDMoE":
        pytest.skip(f"{cls_name} is not in this transformers")
    holder = torch.nn.Module()
    holder.mlp = type(cls_name, (torch.nn.Module,), {})()  # patch_hf decides by class name and children
    with pytest.raises(ValueError, match=re.escape(cls_name) + ".*" + re.escape(REFUSED_BLOCKS[cls_name])):
        moe.patch_hf(holder)


def test_doge_model_is_refused_not_skipped():
    config = transformers.DogeConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64, num_experts=16,
                                     num_experts_per_tok=2, is_moe=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if not any(type(m).__name__ == "DogeCDMoE" for m in model.modules()):
        pytest.skip("this Doge config builds no DogeCDMoE")
    with pytest.raises(ValueError, match="DogeCDMoE"):
        moe.patch_hf(model)



@pytest.mark.parametrize(("cls_name", "layer", "overrides", "reason"), [
    ("DeepseekV4SparseMoeBlock", 0, {}, "hash routing"),  # its first layers pick experts by token id
    ("NemotronHMoE", 0, {"moe_latent_size": 24}, "latent space"),  # experts between latent projections
])
def test_blocks_of_read_families_that_do_not_fit_are_refused(cls_name, layer, overrides, reason):
    """A read family whose config makes a block not fit: patch_hf refuses that block by name, with the reason."""
    block, _ = _tiny_block(cls_name, layer=layer, **overrides)
    with pytest.raises(ValueError, match=re.escape(cls_name) + ".*" + reason):
        moe.MoE.from_hf(block)
    holder = torch.nn.Module()
    holder.mlp = block
    with pytest.raises(ValueError, match=re.escape(cls_name) + ".*" + reason):
        moe.patch_hf(holder)


def test_privacy_filter_block_keeps_its_tuple_output():
    """OpenAI's privacy filter returns ``(hidden, router_scores / k)`` and its layer unpacks both: ``patch_hf``
    wraps it so that both outputs match."""
    block, hidden = _tiny_block("OpenAIPrivacyFilterMLP")
    holder = torch.nn.Module()
    holder.mlp = block
    x = torch.randn(2, 7, hidden)
    with torch.no_grad():
        expected_hidden, expected_scores = block(x)
        assert moe.patch_hf(holder) == 1
        got_hidden, got_scores = holder.mlp(x)
    assert _rel_err(got_hidden, expected_hidden) <= 1e-5
    torch.testing.assert_close(got_scores, expected_scores, rtol=1e-5, atol=1e-6)
