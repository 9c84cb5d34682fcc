"""FP8 experts against an FP8-emulated reference (quantise -> dequantise -> fp32 math)."""

import pytest
import torch

import moe
import quant
from moe.kernels.cpu_gemm import skinny_gemm_available, skinny_gemm_fp8
from moe.reference import reference_moe
from quant.fp8 import BLOCK, FP8, dequantize_weight, quantize_weight


@pytest.mark.parametrize("shape", [(200, 130), (3, 192, 128), (5, 7)])
@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_quantize_layouts_and_error(shape, scheme):
    w = torch.randn(*shape)
    q, scale = quantize_weight(w, scheme)
    assert q.dtype == FP8 and q.shape == w.shape
    O, D = shape[-2:]
    expected = shape[:-1] if scheme == "channel" else (*shape[:-2], -(-O // BLOCK), -(-D // BLOCK))
    assert tuple(scale.shape) == tuple(expected) and scale.dtype == torch.float32
    back = dequantize_weight(q, scale, None if scheme == "channel" else BLOCK)
    assert ((back - w).norm() / w.norm()).item() < 0.04  # e4m3 keeps 3 mantissa bits
    # every value is exactly representable after rescaling: quantising the dequantised weights is lossless
    q2, _ = quantize_weight(back, scheme)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.skipif(not skinny_gemm_available(), reason="needs an AVX2+FMA CPU and a C compiler")
@pytest.mark.parametrize("M", [1, 4, 6, 7, 13])
@pytest.mark.parametrize("O, D, scheme", [(37, 29, "channel"), (260, 300, "block"), (8, 256, "block"),
                                          (36, 520, "channel")])
def test_skinny_fp8_gemm_matches_dequantised_matmul(M, O, D, scheme, skinny_isa):
    q, scale = quantize_weight(torch.randn(O, D), scheme)
    block = 0 if scheme == "channel" else BLOCK
    x = torch.randn(M, D)
    out = torch.full((M, O), float("nan"))
    skinny_gemm_fp8(x, q, scale, block, out)
    expected = x @ dequantize_weight(q, scale, block or None).t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("T", [1, 33, 222])
@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize("activation, bias", [("swiglu", False), ("swiglu_oai", True)])
def test_fp8_layer_matches_emulated_reference(T, scheme, activation, bias):
    layer = moe.MoE(moe.MoEConfig(136, 72, 8, 3, activation=activation, expert_bias=bias, shared_ffn_size=40))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(T, 136)
    with torch.no_grad():
        y32 = layer(x)
        quant.quantize_fp8(layer, scheme)
        assert isinstance(layer.experts, quant.Fp8Experts)
        assert layer.router.weight.dtype == torch.float32 and layer.shared_expert.w13_XD.dtype == torch.float32
        got = layer(x)
        r = layer.router(x)
        w13, w2 = layer.experts.dequantized()
        ex = layer.experts
        expected = reference_moe(x, r.weights_TK, r.ids_TK, w13, w2, activation, ex.b13_E2F, ex.b2_ED)
        expected = expected + layer.shared_expert(x)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-3
    assert ((got - y32).norm() / y32.norm()).item() < 0.1  # sanity: FP8 stays close to the fp32 layer


@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_fp8_expert_bytes_at_most_052_of_bf16(scheme):
    layer = moe.MoE(moe.MoEConfig(512, 384, 4, 2))
    bf16_bytes = sum(p.numel() * 2 for p in (layer.experts.w13_E2FD, layer.experts.w2_EDF))
    quant.quantize_fp8(layer, scheme)
    assert layer.experts.weight_bytes() <= 0.52 * bf16_bytes


def test_quantize_fp8_needs_moe_layers():
    with pytest.raises(ValueError, match="no moe.MoE layer"):
        quant.quantize_fp8(torch.nn.Linear(4, 4), "channel")
    with pytest.raises(ValueError, match=r"scheme \('int4'\)"):
        quant.quantize_fp8(moe.MoE(moe.MoEConfig(8, 8, 2, 1)), "int4")


@pytest.mark.skipif(not skinny_gemm_available(), reason="needs an AVX2+FMA CPU and a C compiler")
@pytest.mark.parametrize("O, D, scheme", [(37, 29, "channel"), (260, 300, "block")])
def test_c_dequantize_matches_torch(O, D, scheme):
    from moe.kernels.cpu_gemm import dequantize_fp8

    q, scale = quantize_weight(torch.randn(O, D), scheme)
    block = 0 if scheme == "channel" else BLOCK
    assert torch.equal(dequantize_fp8(q, scale, block), dequantize_weight(q, scale, block or None))
