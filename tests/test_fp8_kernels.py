"""The Triton FP8 grouped GEMMs (``moe/kernels/fp8_grouped_gemm.py``) against the FP8-emulated reference:
``moe.reference.reference_moe`` on dequantised weights with activations quantised -> dequantised per token and
128 columns (``quant.fp8.fake_quantize_activation``), fp32 math; <= 1e-3 relative error on awkward shapes
(D, F not multiples of 128, experts with no rows, k=3).

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest before any kernel
module is imported), whose e4m3 ``tl.dot`` is exact. Larger shapes, bf16 inputs and CUDA graphs are ``gpu`` tests.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton = pytest.importorskip("triton")

from moe import Backend, MoE, MoEConfig  # noqa: E402
from moe.kernels import fp8_grouped_gemm as fp8k  # noqa: E402
from moe.kernels.index_shuffle import index_shuffle  # noqa: E402
from moe.kernels.schedule import GemmConfig  # noqa: E402
from moe.reference import reference_moe  # noqa: E402
from moe.triton_backend import triton_moe_forward  # noqa: E402
from quant import Fp8Experts  # noqa: E402
from quant.fp8 import FP8, fake_quantize_activation, quantize_activation, quantize_weight  # noqa: E402
from routing.router import Routing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and isinstance(fp8k._fp8_gemm_act_kernel, triton.runtime.JITFunction):
    raise RuntimeError("moe.kernels was imported before TRITON_INTERPRET=1 was set: kernels cannot run on CPU")

pytestmark = pytest.mark.usefixtures("poison_empty")  # anything a kernel fails to write shows up


def _experts(D, F, E, K, scheme, scale=0.2, **config):
    experts = Fp8Experts(MoEConfig(D, F, E, K, quant=f"fp8-{scheme}", **config))
    w13, w2 = (scale * torch.randn(E, experts.config.w13_rows, D)), (scale * torch.randn(E, D, F))
    experts.load_weight("w13_E2FD", (), w13)
    experts.load_weight("w2_EDF", (), w2)
    for b in (experts.b13_E2F, experts.b2_ED):
        if b is not None:
            b.data.normal_(0.0, scale)
    return experts.to(DEVICE)


def _routing(T, E, K, apply_on_input=False):
    ids_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
    ids_TK[ids_TK == E - 1] = 0  # expert E-1 gets no tokens; a token may pick expert 0 twice
    return Routing(torch.rand(T, K, device=DEVICE), ids_TK.to(DEVICE), torch.empty(0), apply_on_input)


def _emulated(x_TD, routing, experts):
    cfg = experts.config
    return reference_moe(x_TD, routing.weights_TK, routing.ids_TK, *experts.dequantized(), cfg.activation,
                         experts.b13_E2F, experts.b2_ED, routing.apply_on_input, cfg.swiglu_alpha, cfg.swiglu_limit,
                         input_quant=fake_quantize_activation)


def _check(x_TD, routing, experts, deterministic=False, rtol=1e-3):
    got = triton_moe_forward(x_TD, routing, experts, deterministic)
    expected = _emulated(x_TD, routing, experts)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert ((got - expected).norm() / expected.norm()).item() <= rtol
    return got


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def test_docstring_example():
    x_q, x_scale = fp8k.group_quant(_t([[2.0, -1.0]]))
    assert torch.equal(x_q.float(), _t([[448.0, -224.0]])) and torch.allclose(x_scale, _t([[2 / 448]]))
    w_q, w_scale = quantize_weight(_t([[[1.0, 0.5]]]), "channel")
    h_q, h_scale = fp8k.fp8_gemm_act(x_q, x_scale, _t([0], torch.int64), _t([0], torch.int64), _t([1], torch.int32),
                                     w_q, w_scale, "channel", "relu")
    assert torch.allclose(h_q.float() * h_scale, _t([[1.5]]))


@pytest.mark.parametrize("T, D", [(1, 7), (33, 130), (5, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_group_quant_is_quantize_activation_bit_for_bit(T, D, dtype):
    x = (torch.randn(T, D) * torch.logspace(-6, 2, D)).to(dtype)  # every binade, e4m3 subnormals included
    x[0, : min(D, 128)] = 0.0  # an all-zero group
    got_q, got_scale = fp8k.group_quant(x.to(DEVICE))
    q, scale = quantize_activation(x)
    assert got_q.dtype == FP8 and torch.equal(got_q.cpu().float(), q.float()) and torch.equal(got_scale.cpu(), scale)


@pytest.mark.parametrize("T", [1, 33, 222])
@pytest.mark.parametrize("E, K", [(4, 1), (8, 3)])
@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_swiglu_matches_emulated_reference(T, E, K, scheme):
    experts = _experts(200, 136, E, K, scheme)  # D, F ragged: 2 groups each, the second partial
    _check(torch.randn(T, 200, device=DEVICE), _routing(T, E, K), experts)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "swiglu_oai", "swiglu_clamped", "gelu", "relu"])
def test_every_activation_with_biases(activation):
    experts = _experts(72, 40, 6, 2, "block", activation=activation, expert_bias=True, swiglu_limit=0.5)
    _check(torch.randn(33, 72, device=DEVICE), _routing(33, 6, 2), experts)


def test_weight_on_input_llama4_with_biases():
    experts = _experts(136, 260, 8, 2, "channel", expert_bias=True)
    _check(torch.randn(33, 136, device=DEVICE), _routing(33, 8, 2, apply_on_input=True), experts)


def test_deterministic_is_reproducible_and_batch_invariant():
    experts = _experts(136, 72, 8, 3, "block")
    x_TD, routing = torch.randn(33, 136, device=DEVICE), _routing(33, 8, 3)
    first = _check(x_TD, routing, experts, deterministic=True)
    assert torch.equal(first, triton_moe_forward(x_TD, routing, experts, True))
    head = Routing(routing.weights_TK[:5].contiguous(), routing.ids_TK[:5].contiguous(), routing.logits_TE)
    assert torch.equal(triton_moe_forward(x_TD[:5], head, experts, True), first[:5])


@pytest.mark.parametrize("scheme", ["fp8-channel", "fp8-block"])
def test_layer_with_quant_config_uses_the_fp8_kernels(scheme, monkeypatch):
    layer = MoE(MoEConfig(136, 72, 8, 2, quant=scheme, backend=Backend.TRITON, shared_ffn_size=24)).to(DEVICE)
    monkeypatch.setattr(layer.experts, "forward", None)  # the fused path must not call the torch experts
    x = torch.randn(3, 11, 136, device=DEVICE)
    with torch.no_grad():
        got = layer(x)
        x_TD = x.reshape(-1, 136)
        expected = _emulated(x_TD, layer.router(x_TD), layer.experts) + layer.shared_expert(x_TD)
    assert got.shape == x.shape
    assert ((got.reshape(-1, 136) - expected).norm() / expected.norm()).item() <= 1e-3


@pytest.mark.parametrize("config1, config2", [
    (GemmConfig(32, 128, 128, 1), GemmConfig(32, 64, 128, 1)),
    (GemmConfig(16, 128, 128, 4), GemmConfig(64, 32, 128, 8)),
])
def test_pinned_tiles_cover_partial_tiles(config1, config2):
    experts, T, K = _experts(200, 136, 5, 2, "block"), 45, 2
    routing = _routing(T, 5, K)
    x_TD = torch.randn(T, 200, device=DEVICE)
    order_N, token_idx_N, _, counts_E, _ = index_shuffle(routing.ids_TK, 5)
    x_q, x_scale = fp8k.group_quant(x_TD)
    h_q, h_scale = fp8k.fp8_gemm_act(x_q, x_scale, token_idx_N, order_N, counts_E, experts.w13_E2FD,
                                     experts.w13_scale, "block", config=config1)
    got = fp8k.fp8_gemm_combine(h_q, h_scale, token_idx_N, order_N, counts_E, experts.w2_EDF, experts.w2_scale,
                                "block", routing.weights_TK, config=config2)
    expected = _emulated(x_TD, routing, experts)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-3


def _act_args(experts, T=3):
    x_q, x_scale = fp8k.group_quant(torch.randn(T, experts.w13_E2FD.shape[2], device=DEVICE))
    order_N, token_idx_N, _, counts_E, _ = index_shuffle(_routing(T, experts.num_experts, 2).ids_TK,
                                                         experts.num_experts)
    return dict(x_TD=x_q, x_scale_TG=x_scale, token_idx_N=token_idx_N, order_N=order_N, counts_E=counts_E,
                w13_EXD=experts.w13_E2FD, w13_scale=experts.w13_scale, scheme="block")


@pytest.mark.parametrize("change, match", [
    (dict(scheme="tensor"), r"scheme \('tensor'\) must be one of \['block', 'channel'\]"),
    (dict(w13_scale=torch.ones(4, 2, 2)), r"w13_EXD's scale \(torch.float32, \(4, 2, 2\)\) must be fp32 \(4, 2, 1\)"),
    (dict(w13_EXD=torch.ones(4, 80, 72)), r"w13_EXD \(torch.float32, \(4, 80, 72\)\) must be torch.float8_e4m3fn"),
    (dict(config=GemmConfig(16, 128, 64)), r"FP8 GEMM 1 needs block_k and block_n = 128"),
    (dict(activation="tanh"), r"activation \('tanh'\) must be one of"),
])
def test_fp8_gemm_act_rejects_bad_input(change, match):
    args = {**_act_args(_experts(72, 40, 4, 2, "block")), **change}
    with pytest.raises(ValueError, match=match):
        fp8k.fp8_gemm_act(**args)


def test_gpu_benchmark_parses_and_declines_without_a_gpu():
    from benchmarks import gpu_fp8

    args = gpu_fp8.parse_args(["--models", "qwen3", "--tokens", "1", "4096", "--schemes", "fp8-block"])
    assert (args.models, args.tokens, args.schemes) == (["qwen3"], [1, 4096], ["fp8-block"])
    if not torch.cuda.is_available():
        assert gpu_fp8.main(["--models", "qwen3"]) == 2


# ---------------------------------------------------------------- GPU only (skipped on CPU machines)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 4096])
@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bf16_inputs_on_gpu(T, scheme, deterministic):
    experts = _experts(1024, 704, 8, 2, scheme, scale=0.05)  # F = 704: not a multiple of 128
    x_TD = torch.randn(T, 1024, device=DEVICE).bfloat16()
    _check(x_TD, _routing(T, 8, 2), experts, deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 64])
def test_cuda_graph_capture_and_replay_on_gpu(T):
    layer = MoE(MoEConfig(256, 192, 16, 4, quant="fp8-block", backend=Backend.TRITON)).to(DEVICE, torch.bfloat16)
    assert layer.experts.w13_E2FD.dtype == FP8  # .to(dtype) moves the FP8 experts without casting them
    static_x = torch.randn(T, 256, device=DEVICE).bfloat16()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x)  # compile before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            expected = _emulated(static_x, layer.router(static_x), layer.experts)
            assert ((static_y.float() - expected).norm() / expected.norm()).item() <= 1e-2  # y rounded to bf16
