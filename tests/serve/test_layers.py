"""Decoder building blocks: RMSNorm's inference paths against the transformers formula (the torch op bit for bit,
the C op within float rounding), and the fused q/k norm + rotation against the layer's torch ops."""

import pytest
import torch
import torch.nn.functional as F

from serve.models import cpu_ops
from serve.models.layers import RMSNorm, apply_rope


def _formula(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps))


@pytest.mark.parametrize("shape", [(1, 128), (33, 7, 32), (222, 1000)])
def test_rms_norm_paths_match_the_formula(shape):
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(shape) * 3.0
    with torch.enable_grad():  # the formula path (autograd on)
        expected = norm(x).detach()
    assert torch.equal(expected, _formula(norm, x).detach())
    with torch.inference_mode():
        assert cpu_ops.fused(x)
        got = norm(x)  # the C op
        torch_op = F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    assert torch.equal(torch_op, expected)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    assert not torch.equal(got, torch.full_like(got, float("nan")))


@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary,normed", [(4, 2, 32, 32, True), (3, 1, 10, 6, False),
                                                                   (8, 8, 64, 16, True)])
def test_qk_norm_rope_matches_the_torch_ops(heads, kv_heads, head_dim, rotary, normed):
    torch.manual_seed(heads)
    T = 33
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim)
    q_w, k_w = (torch.randn(head_dim), torch.randn(head_dim)) if normed else (None, None)
    cos, sin = torch.randn(T, rotary), torch.randn(T, rotary)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)

    def reference(x, w, h):
        x = x.reshape(T, h, head_dim)
        if w is not None:
            x = F.rms_norm(x, (head_dim,), w, 1e-6)
        return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], -1)

    with torch.inference_mode():
        got_q, got_k = cpu_ops.qk_norm_rope(qkv, heads, kv_heads, head_dim, q_w, k_w, 1e-6, cos, sin)
    torch.testing.assert_close(got_q, reference(q, q_w, heads), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got_k, reference(k, k_w, kv_heads), rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="head_dim"):
        cpu_ops.qk_norm_rope(torch.zeros(1, 3 * 2048), 1, 1, 2048, None, None, 1e-6, cos[:1], sin[:1])
