"""The CPU skinny GEMM against torch's matmul on awkward shapes (tails in every dimension)."""

import pytest
import torch

from moe.cpu_gemm import skinny_gemm, skinny_gemm_available, skinny_gemm_grouped

pytestmark = pytest.mark.skipif(not skinny_gemm_available(), reason="needs an AVX2+FMA CPU and a C compiler")


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 33])
@pytest.mark.parametrize("O, D", [(1, 1), (4, 8), (37, 29), (130, 261)])
def test_matches_matmul(M, O, D):
    x, w = torch.randn(M, D), torch.randn(O, D)
    out = torch.full((M, O), float("nan"))
    skinny_gemm(x, w, out_MO=out)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_strided_rows_write_into_a_slice():
    x_big, w_big = torch.randn(10, 50), torch.randn(40, 64)
    x, w = x_big[2:7, 3:35], w_big[5:30, :32]  # row strides 50 and 64, unit column stride
    y = torch.full((12, 25), float("nan"))
    skinny_gemm(x, w, out_MO=y[4:9])
    torch.testing.assert_close(y[4:9], x @ w.t(), rtol=1e-5, atol=1e-5)
    assert torch.isnan(y[:4]).all() and torch.isnan(y[9:]).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="disagree on D"):
        skinny_gemm(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="x_MD must be a CPU torch.float32"):
        skinny_gemm(torch.randn(2, 3).double(), torch.randn(4, 3))
    with pytest.raises(ValueError, match="unit-stride"):
        skinny_gemm(torch.randn(3, 2).t(), torch.randn(4, 3))


@pytest.mark.parametrize("counts, O, D", [([2, 0, 5], 13, 21), ([3, 1, 0, 7, 32, 2, 9, 4], 37, 29), ([1], 4, 8),
                                          ([0, 0], 8, 8)])
def test_grouped_matches_per_expert_matmul(counts, O, D):
    w_LOD, counts_L = torch.randn(len(counts), O, D), torch.tensor(counts)
    x_RD = torch.randn(sum(counts), D)
    y = skinny_gemm_grouped(x_RD, w_LOD, counts_L)
    starts = [sum(counts[:e]) for e in range(len(counts))]
    expected = torch.cat([x_RD[s:s + n] @ w_LOD[e].t() for e, (s, n) in enumerate(zip(starts, counts))])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_grouped_refuses_counts_beyond_the_rows():
    with pytest.raises(ValueError, match="sum to at most the 3 rows"):
        skinny_gemm_grouped(torch.randn(3, 8), torch.randn(2, 4, 8), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="must be \\[2\\]"):
        skinny_gemm_grouped(torch.randn(3, 8), torch.randn(2, 4, 8), torch.tensor([3]))
