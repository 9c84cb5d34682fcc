"""Both torch-backend grouped FFN strategies against the reference, including experts with zero rows."""

import pytest
import torch

from moe.activations import ActivationSpec
from moe.backends import grouped_mm_ffn, loop_ffn
from moe.config import Activation
from moe.reference import reference_expert


def _blocks(counts, D=40, F=24, activation=Activation.SWIGLU, bias=False):
    E = len(counts)
    X = 2 * F if activation.gated else F
    w13, w2 = 0.2 * torch.randn(E, X, D), 0.2 * torch.randn(E, D, F)
    b13, b2 = (0.1 * torch.randn(E, X), 0.1 * torch.randn(E, D)) if bias else (None, None)
    x = torch.randn(sum(counts), D)
    expected, start = [], 0
    for e, rows in enumerate(counts):
        expected.append(reference_expert(x[start:start + rows], w13[e], w2[e], activation,
                                         None if b13 is None else b13[e], None if b2 is None else b2[e]))
        start += rows
    return x, torch.tensor(counts, dtype=torch.int32), w13, w2, b13, b2, torch.cat(expected)


@pytest.mark.parametrize("ffn", [loop_ffn, grouped_mm_ffn])
@pytest.mark.parametrize("counts", [[1], [2, 0, 7, 32, 1], [60, 0, 90, 51], [0, 3, 0, 40], [5, 0, 0, 0, 2, 33, 1, 0],
                                    [400, 0, 7]])
@pytest.mark.parametrize("activation, bias", [(Activation.SWIGLU, False), (Activation.SWIGLU_OAI, True),
                                              (Activation.GELU, True)])
def test_strategy_matches_reference(ffn, counts, activation, bias):
    x, counts_E, w13, w2, b13, b2, expected = _blocks(counts, activation=activation, bias=bias)
    got = ffn(x, counts_E, w13, w2, ActivationSpec(activation), b13, b2)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_loop_ffn_gradients_match_reference_under_autograd():
    x, counts_E, w13, w2, _, _, _ = _blocks([3, 0, 5, 1])
    for t in (x, w13, w2):
        t.requires_grad_(True)
    loop_ffn(x, counts_E, w13, w2, ActivationSpec()).square().sum().backward()
    grads = [t.grad.clone() for t in (x, w13, w2)]
    for t in (x, w13, w2):
        t.grad = None
    start, outs = 0, []
    for e, rows in enumerate(counts_E.tolist()):
        outs.append(reference_expert(x[start:start + rows], w13[e], w2[e], Activation.SWIGLU))
        start += rows
    torch.cat(outs).square().sum().backward()
    for got, t in zip(grads, (x, w13, w2), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)
