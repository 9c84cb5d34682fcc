"""``triton_moe_forward`` and ``MoE(backend="triton")`` against ``moe/reference.py`` on awkward shapes.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest before any kernel
module is imported): fp32 and fp16 only (the interpreter's bf16 ``tl.dot`` is wrong, triton#11584). bf16,
large T, autotuning and CUDA-graph capture are ``gpu`` tests.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton = pytest.importorskip("triton")

from moe import Activation, Backend, MoE, MoEConfig  # noqa: E402
from moe.experts import Experts  # noqa: E402
from moe.kernels import gemm_combine as gemm_combine_module  # noqa: E402
from moe.reference import reference_moe, reference_moe_layer  # noqa: E402
from moe.triton_backend import triton_moe_forward  # noqa: E402
from routing import RouterConfig, Scoring  # noqa: E402
from routing.router import Routing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and isinstance(gemm_combine_module._gemm_combine_kernel, triton.runtime.JITFunction):
    raise RuntimeError("moe.kernels was imported before TRITON_INTERPRET=1 was set: kernels cannot run on CPU")


pytestmark = pytest.mark.usefixtures("poison_empty")  # anything a kernel fails to write shows up


def _experts(D, F, E, K, dtype=torch.float32, scale=0.2, **config):
    experts = Experts(MoEConfig(D, F, E, K, **config))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, scale)
    return experts.to(device=DEVICE, dtype=dtype).requires_grad_(False)


def _routing(T, E, K, apply_on_input=False):
    ids_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
    ids_TK[ids_TK == E - 1] = 0  # expert E-1 gets no tokens; a token may pick expert 0 twice
    weights_TK = torch.rand(T, K)
    return Routing(weights_TK.to(DEVICE), ids_TK.to(DEVICE), torch.empty(0), apply_on_input)


def _check(x_TD, routing, experts, deterministic=False, rtol=1e-5, **kwargs):
    cfg = experts.config
    got = triton_moe_forward(x_TD, routing, experts, deterministic, **kwargs)
    expected = reference_moe(
        x_TD, routing.weights_TK, routing.ids_TK, experts.w13_E2FD, experts.w2_EDF, cfg.activation,
        experts.b13_E2F, experts.b2_ED, routing.apply_on_input, cfg.swiglu_alpha, cfg.swiglu_limit,
    )
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert ((got - expected).norm() / expected.norm()).item() <= rtol
    return got


@pytest.mark.parametrize("T", [1, 33, 222])
@pytest.mark.parametrize("E, K", [(4, 1), (8, 2), (8, 3)])
def test_swiglu_fp32_matches_reference(T, E, K):
    experts = _experts(48, 40, E, K)
    _check(torch.randn(T, 48, device=DEVICE), _routing(T, E, K), experts)


@pytest.mark.parametrize("T, E, K", [(1, 8, 2), (222, 4, 3)])
def test_fp16(T, E, K):
    experts = _experts(48, 40, E, K, dtype=torch.float16)
    _check(0.5 * torch.randn(T, 48, device=DEVICE).half(), _routing(T, E, K), experts, rtol=2e-3)


@pytest.mark.parametrize("activation", [a for a in Activation if not a.torch_only])  # (the others: test_layer)
def test_every_activation_with_biases(activation):
    experts = _experts(40, 24, 6, 2, activation=activation, expert_bias=True, swiglu_limit=0.5)
    _check(torch.randn(33, 40, device=DEVICE), _routing(33, 6, 2), experts)


def test_weight_on_input_llama4_with_biases():
    experts = _experts(48, 40, 8, 2, expert_bias=True)
    _check(torch.randn(33, 48, device=DEVICE), _routing(33, 8, 2, apply_on_input=True), experts)


def test_deterministic_is_reproducible_and_batch_invariant():
    experts = _experts(48, 40, 8, 3)
    x_TD, routing = torch.randn(33, 48, device=DEVICE), _routing(33, 8, 3)
    first = _check(x_TD, routing, experts, deterministic=True)
    assert torch.equal(first, triton_moe_forward(x_TD, routing, experts, True))
    head = Routing(routing.weights_TK[:5].contiguous(), routing.ids_TK[:5].contiguous(), routing.logits_TE)
    assert torch.equal(triton_moe_forward(x_TD[:5], head, experts, True), first[:5])


def _layer(backend=Backend.TRITON, **config):
    layer = MoE(MoEConfig(48, 40, 8, 2, backend=backend, **config)).to(DEVICE)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    return layer


@pytest.mark.parametrize("deterministic", [False, True])
def test_layer_uses_triton_and_matches_reference(deterministic, monkeypatch):
    layer = _layer(deterministic=deterministic, shared_ffn_size=16)
    monkeypatch.setattr(layer.experts, "forward", None)  # the fused path must not call the torch experts
    x = torch.randn(3, 11, 48, device=DEVICE)
    with torch.no_grad():
        got, expected = layer(x), reference_moe_layer(layer, x)
    assert got.shape == x.shape and ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_layer_sigmoid_router_weight_on_input():
    llama4 = RouterConfig(8, 1, scoring=Scoring.SIGMOID, renormalize=False, apply_on_input=True)
    layer = MoE(MoEConfig(32, 16, 8, 1, router=llama4, backend=Backend.TRITON)).to(DEVICE)
    x = torch.randn(33, 32, device=DEVICE)
    with torch.no_grad():
        got, expected = layer(x), reference_moe_layer(layer, x)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_autograd_uses_the_differentiable_torch_path_and_kernels_refuse_it():
    layer = _layer()
    x = torch.randn(4, 48, device=DEVICE)
    with pytest.raises(RuntimeError, match="inference-only"):  # the kernels have no backward
        triton_moe_forward(x, layer.router(x), layer.experts, False)
    y = layer(x)  # the layer falls back to the torch path under autograd
    y.sum().backward()
    assert layer.experts.w13_E2FD.grad is not None and torch.isfinite(layer.experts.w13_E2FD.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(y.detach(), reference_moe_layer(layer, x), rtol=1e-5, atol=1e-5)


def test_unsupported_config_fails_at_construction():
    with pytest.raises(ValueError, match=r"num_experts \(2048\) must be <= 1024"):
        MoE(MoEConfig(16, 8, 2048, 2, backend=Backend.TRITON))


# ---------------------------------------------------------------- GPU only (skipped on CPU machines)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 33, 222, 4096])
@pytest.mark.parametrize("E, K", [(8, 2), (64, 8)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bf16_on_gpu(T, E, K, deterministic):
    experts = _experts(256, 192, E, K, dtype=torch.bfloat16, scale=0.1)
    x_TD = 0.1 * torch.randn(T, 256, device=DEVICE).bfloat16()
    routing = _routing(T, E, K)
    got = triton_moe_forward(x_TD, routing, experts, deterministic)
    expected = reference_moe(x_TD, routing.weights_TK, routing.ids_TK, experts.w13_E2FD, experts.w2_EDF)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("autotune", [False, True])
def test_large_token_count_on_gpu(autotune):
    experts = _experts(128, 64, 8, 2, dtype=torch.float16, scale=0.1)
    _check(0.1 * torch.randn(70000, 128, device=DEVICE).half(), _routing(70000, 8, 2), experts, rtol=2e-3,
           autotune=autotune)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 64])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture_and_replay(T, deterministic):
    layer = _layer(deterministic=deterministic).to(torch.bfloat16)
    static_x = 0.1 * torch.randn(T, 48, device=DEVICE).bfloat16()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x)  # compile and autotune before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(3):
            static_x.copy_(0.1 * torch.randn_like(static_x))
            graph.replay()
            expected = reference_moe_layer(layer, static_x).float()
            torch.testing.assert_close(static_y.float(), expected, atol=2e-2, rtol=0)
