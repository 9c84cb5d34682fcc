"""``moe.MoE`` (torch backend) against ``moe/reference.py`` on awkward shapes, and config validation."""

import pytest
import torch

from moe import Activation, MoE, MoEConfig
from moe.reference import reference_moe_layer
from routing import RouterConfig, Scoring


def _randomise(layer: MoE) -> MoE:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
        if layer.router.correction_bias is not None:
            layer.router.correction_bias.normal_(0.0, 0.1)
    return layer


def _check(layer: MoE, x: torch.Tensor, rtol: float = 1e-5) -> None:
    with torch.no_grad():
        got, expected = layer(x), reference_moe_layer(layer, x)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert ((got - expected).norm() / expected.norm()).item() <= rtol


@pytest.mark.parametrize("T", [1, 33, 222])
@pytest.mark.parametrize("E, K", [(4, 1), (8, 2), (8, 3)])
def test_swiglu_matches_reference(T, E, K):
    layer = _randomise(MoE(MoEConfig(48, 40, E, K)))
    _check(layer, torch.randn(T, 48))


# T=222: 444 rows over 8 experts, so some expert gets > 32 rows: the layer does not even try the C path.
@pytest.mark.parametrize("T, calls", [(1, [True]), (33, [True]), (222, [])])
def test_decode_sized_cpu_calls_take_the_two_call_path(T, calls, monkeypatch):
    from moe.kernels import cpu_gemm
    from moe.kernels.cpu_gemm import skinny_gemm_available

    if not skinny_gemm_available():
        pytest.skip("needs an AVX2+FMA CPU and a C compiler")
    seen = []
    real = cpu_gemm.decode_moe

    def recorded(*args, **kwargs):
        y = real(*args, **kwargs)
        seen.append(y is not None)
        return y

    monkeypatch.setattr("moe.backends.decode_moe", recorded)
    layer = _randomise(MoE(MoEConfig(48, 40, 8, 2)))
    _check(layer, torch.randn(T, 48))  # the layer runs once (the reference has its own math)
    assert seen == calls


@pytest.mark.parametrize("activation", list(Activation))
def test_every_activation_with_biases_and_shared_expert(activation):
    cfg = MoEConfig(40, 24, 6, 2, activation=activation, expert_bias=True, shared_ffn_size=20,
                    shared_expert_gate=True)
    _check(_randomise(MoE(cfg)), torch.randn(3, 11, 40))


def test_relu2_and_softcapped_swiglu_match_their_definitions():
    """The two activations by their formulas (the reference shares moe.activations, so check them directly),
    out of place, in place, and with the config's softcaps reaching the experts."""
    from moe.activations import ActivationSpec

    h = 4 * torch.randn(7, 10)
    gate, up = h.chunk(2, dim=-1)
    softcap = lambda x, c: c * torch.tanh(x / c)  # noqa: E731
    expected = {Activation.RELU2: torch.relu(h) ** 2,
                Activation.SWIGLU_SOFTCAPPED: softcap(gate, 2.0) * torch.sigmoid(gate) * softcap(up, 3.0)}
    for activation, want in expected.items():
        spec = ActivationSpec.of(MoEConfig(10, 5, 4, 2, activation=activation, swiglu_gate_softcap=2.0,
                                           swiglu_up_softcap=3.0))
        torch.testing.assert_close(spec(h), want)
        torch.testing.assert_close(spec.in_place(h.clone()), want)


@pytest.mark.parametrize("activation", [a for a in Activation if a.torch_only])
def test_torch_only_activations_refuse_triton_and_auto_picks_torch(activation):
    cfg = dict(hidden_size=16, ffn_size=8, num_experts=4, top_k=2, activation=activation)
    with pytest.raises(ValueError, match=f"{activation.value}.*no Triton"):
        MoE(MoEConfig(**cfg, backend="triton"))
    assert MoE(MoEConfig(**cfg, backend="auto")).backend.value == "torch"


def test_expert_with_zero_tokens():
    layer = _randomise(MoE(MoEConfig(32, 16, 8, 2)))
    with torch.no_grad():
        layer.router.weight[7] = -10.0 * layer.router.weight[:7].abs().sum(0)  # expert 7 never chosen
    x = torch.randn(33, 32).abs()
    ids = layer.router(x).ids_TK
    assert not (ids == 7).any()
    _check(layer, x)


def test_llama4_style_input_scaling_and_deepseek_style_router():
    llama4 = RouterConfig(8, 1, scoring=Scoring.SIGMOID, renormalize=False, apply_on_input=True)
    _check(_randomise(MoE(MoEConfig(32, 16, 8, 1, router=llama4, shared_ffn_size=16))), torch.randn(33, 32))
    ds = RouterConfig(8, 3, scoring=Scoring.SIGMOID, correction_bias=True, num_groups=4, topk_groups=2,
                      routed_scaling_factor=2.5)
    _check(_randomise(MoE(MoEConfig(32, 16, 8, 3, router=ds))), torch.randn(33, 32))


def test_bf16_input_keeps_dtype():
    layer = _randomise(MoE(MoEConfig(32, 16, 4, 2)))
    x = (0.1 * torch.randn(5, 32)).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference_moe_layer(layer, x.float()), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=8, ffn_size=8, num_experts=4, top_k=5), r"top_k \(5\)"),
        (dict(hidden_size=8, ffn_size=8, num_experts=4, top_k=2, activation="tanh"), r"activation \('tanh'\)"),
        (dict(hidden_size=0, ffn_size=8, num_experts=4, top_k=2), r"hidden_size \(0\)"),
        (dict(hidden_size=8, ffn_size=8, num_experts=4, top_k=2, shared_expert_gate=True), "shared_expert_gate"),
        (dict(hidden_size=8, ffn_size=8, num_experts=4, top_k=2, router=RouterConfig(8, 2)), "num_experts"),
        (dict(hidden_size=8, ffn_size=8, num_experts=4, top_k=2, swiglu_up_softcap=0.0), "softcaps"),
    ],
)
def test_bad_config_raises_naming_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_hidden_size_mismatch_raises():
    layer = MoE(MoEConfig(16, 8, 4, 2))
    with pytest.raises(ValueError, match=r"input hidden size \(12\).*hidden_size \(16\)"):
        layer(torch.randn(3, 12))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_on_cuda_matches_reference(dtype):
    layer = _randomise(MoE(MoEConfig(256, 128, 8, 2, backend="torch"))).cuda().to(dtype)
    x = (0.1 * torch.randn(33, 256, device="cuda")).to(dtype)
    with torch.no_grad():
        got, expected = layer(x).float(), reference_moe_layer(layer.float(), x.float()).float()
    torch.testing.assert_close(got, expected, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=2e-2)
