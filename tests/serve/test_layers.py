"""Decoder building blocks: the inference fast path of RMSNorm equals the transformers formula bit for bit."""

import pytest
import torch

from serve.models.layers import RMSNorm


@pytest.mark.parametrize("shape", [(1, 128), (33, 7, 32), (222, 1000)])
def test_rms_norm_fast_path_is_bit_identical_to_the_formula(shape):
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(shape) * 3.0
    with torch.enable_grad():  # the formula path (autograd on)
        expected = norm(x).detach()
    with torch.inference_mode():
        got = norm(x)
    x32 = x.float()
    formula = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps))
    assert torch.equal(got, expected) and torch.equal(expected, formula.detach())
