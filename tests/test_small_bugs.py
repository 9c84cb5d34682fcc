"""Issue 19's small bugs: ``moe.patch_hf`` twice is a no-op; ``quant.quantize_fp8`` takes the project's scheme
names (``fp8-block``, ``fp8-channel``) as well as ``block``/``channel``; ``moe-serve``'s routing statistics (and so
``moe-report``'s figure titles) carry the served model's name."""

from __future__ import annotations

import pytest
import torch

import moe
import quant
from moe.config import Quant
from tests.hf_tiny import tiny_model


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # gpt-oss: wrapped in TupleOutputMoE
def test_patch_hf_twice_is_a_no_op(family):
    model = tiny_model(family)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 9))
    first = moe.patch_hf(model)
    layers = [m for m in model.modules() if isinstance(m, moe.MoE)]
    with torch.no_grad():
        before = model(input_ids).logits
    assert first == len(layers) > 0
    assert moe.patch_hf(model) == 0
    assert [m for m in model.modules() if isinstance(m, moe.MoE)] == layers  # the same objects, not re-wrapped
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, before)


def test_patch_hf_on_an_moe_layer_is_a_no_op():
    layer = moe.MoE(moe.MoEConfig(8, 8, 2, 1))
    assert moe.patch_hf(layer) == 0


@pytest.mark.parametrize("name,expected", [("fp8-block", Quant.FP8_BLOCK), ("fp8-channel", Quant.FP8_CHANNEL),
                                           ("block", Quant.FP8_BLOCK), ("channel", Quant.FP8_CHANNEL),
                                           (Quant.FP8_BLOCK, Quant.FP8_BLOCK)])
def test_quantize_fp8_takes_both_scheme_spellings(name, expected):
    torch.manual_seed(0)
    layer = moe.MoE(moe.MoEConfig(136, 72, 4, 2))
    x = torch.randn(5, 136)
    quant.quantize_fp8(layer, name)
    assert isinstance(layer.experts, quant.Fp8Experts) and layer.config.quant is expected
    with torch.no_grad():
        assert torch.isfinite(layer(x)).all()


def test_quantize_fp8_still_refuses_other_schemes():
    with pytest.raises(ValueError, match=r"scheme \('fp8-int4'\) is not one of: channel, block"):
        quant.quantize_fp8(moe.MoE(moe.MoEConfig(8, 8, 2, 1)), "fp8-int4")
