"""The CPU skinny GEMM against torch's matmul on awkward shapes (tails in every dimension)."""

import pytest
import torch

from moe.cpu_gemm import skinny_gemm, skinny_gemm_available

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
