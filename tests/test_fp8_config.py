"""``MoEConfig(quant=...)`` builds FP8 experts directly; ``EngineConfig(quantization=...)`` is validated; the FP8
experts' layout (gate and up blocks apart), ``.to(dtype)`` and expert-parallel sharding keep their tensors."""

import pytest
import torch

import moe
import quant
from expert_parallel.shard import local_experts
from moe.experts import Experts
from moe.reference import reference_moe
from quant.fp8 import FP8, quantize_weight
from serve.engine.config import EngineConfig


@pytest.mark.parametrize("value, scheme", [("fp8-channel", "channel"), ("fp8-block", "block"),
                                           (moe.Quant.FP8_BLOCK, "block")])
def test_config_builds_fp8_experts(value, scheme):
    config = moe.MoEConfig(136, 72, 8, 3, quant=value)
    assert config.quant is moe.Quant(value) and config.quant.scheme == scheme
    layer = moe.MoE(config)
    ex = layer.experts
    assert isinstance(ex, quant.Fp8Experts) and ex.scheme.value == scheme
    assert ex.w13_E2FD.dtype == FP8 and ex.w2_EDF.dtype == FP8 and ex.w13_scale.dtype == torch.float32
    expected13 = (8, 144) if scheme == "channel" else (8, 2, 2)  # block: gate and up halves, 72 rows -> 1 block each
    assert tuple(ex.w13_scale.shape) == expected13
    assert layer.router.weight.dtype == torch.float32
    assert type(moe.MoE(moe.MoEConfig(136, 72, 8, 3)).experts) is Experts


def test_bad_quant_names_field_and_value():
    with pytest.raises(ValueError, match=r"quant \('int4'\) is not one of: fp8-channel, fp8-block"):
        moe.MoEConfig(16, 8, 4, 2, quant="int4")
    with pytest.raises(ValueError, match=r"Fp8Experts needs config.quant"):
        quant.Fp8Experts(moe.MoEConfig(16, 8, 4, 2))


@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("scheme", ["fp8-channel", "fp8-block"])
def test_config_layer_matches_emulated_reference(T, scheme):
    layer = moe.MoE(moe.MoEConfig(136, 72, 8, 3, quant=scheme, expert_bias=True, activation="geglu"))
    with torch.no_grad():
        layer.experts.b13_E2F.normal_()
        layer.experts.b2_ED.normal_()
        x = torch.randn(T, 136)
        got, r = layer.forward_with_routing(x)
        ex = layer.experts
        expected = reference_moe(x, r.weights_TK, r.ids_TK, *ex.dequantized(), "geglu", ex.b13_E2F, ex.b2_ED)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5  # CPU path: weight-only, fp32 math


def test_block_scales_of_gate_and_up_are_their_own():
    """A per-expert checkpoint quantises gate_proj and up_proj apart; with F = 200 (not a multiple of 128) a grid
    over the fused 2F rows would mix them in one block row, so each half has blocks of its own."""
    source = Experts(moe.MoEConfig(136, 200, 3, 2))
    ex = quant.Fp8Experts(moe.MoEConfig(136, 200, 3, 2, quant="fp8-block"), weights=source)
    assert tuple(ex.w13_scale.shape) == (3, 4, 2)
    for e in range(3):
        for rows in (slice(0, 200), slice(200, 400)):
            q, scale = quantize_weight(source.w13_E2FD[e, rows], "block")
            assert torch.equal(ex.w13_E2FD[e, rows].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(ex.w13_scale[e, ex.scale_index("w13_E2FD", (e, rows))[1]], scale)
    w13, _ = ex.dequantized()
    assert ((w13 - source.w13_E2FD).norm() / source.w13_E2FD.norm()).item() < 0.04


def test_quantize_fp8_records_the_scheme_in_the_config():
    layer = moe.MoE(moe.MoEConfig(64, 32, 4, 2))
    quant.quantize_fp8(layer, "channel")
    assert layer.config.quant is moe.Quant.FP8_CHANNEL and layer.experts.config.quant is moe.Quant.FP8_CHANNEL


def test_to_dtype_keeps_fp8_storage():
    layer = moe.MoE(moe.MoEConfig(64, 32, 4, 2, quant="fp8-block", expert_bias=True))
    before = {k: v.clone() for k, v in layer.experts.state_dict().items()}
    layer.to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.bfloat16  # the rest of the layer follows .to(dtype)
    for k, v in layer.experts.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v.view(torch.uint8), before[k].view(torch.uint8)), k
    assert layer(torch.randn(5, 64).bfloat16()).dtype == torch.bfloat16


def test_expert_parallel_local_experts_copies_fp8_experts():
    ex = moe.MoE(moe.MoEConfig(64, 32, 4, 2, quant="fp8-block")).experts
    local = local_experts(ex, [3, 1])
    assert type(local) is quant.Fp8Experts and local.num_experts == 2
    for name in ("w13_E2FD", "w13_scale", "w2_EDF", "w2_scale"):
        full, part = getattr(ex, name), getattr(local, name)
        assert torch.equal(part.view(torch.uint8), full[[3, 1]].view(torch.uint8)), name


def test_engine_config_quantization_field():
    assert EngineConfig(quantization="fp8-block").quantization == "fp8-block"
    assert EngineConfig().quantization is None
    with pytest.raises(ValueError, match=r"quantization \('fp8'\) is not one of: fp8-channel, fp8-block"):
        EngineConfig(quantization="fp8")

