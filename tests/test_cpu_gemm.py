"""The CPU skinny GEMM against torch's matmul on awkward shapes (tails in every dimension)."""

import functools

import pytest
import torch

from moe.kernels.cpu_gemm import (
    block_gemm_grouped,
    block_gemm_has_avx512,
    skinny_gemm,
    skinny_gemm_available,
    skinny_gemm_grouped,
)

pytestmark = pytest.mark.skipif(not skinny_gemm_available(), reason="needs an AVX2+FMA CPU and a C compiler")


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 13, 33])
@pytest.mark.parametrize("O, D", [(1, 1), (4, 8), (37, 29), (130, 261)])
def test_matches_matmul(M, O, D, skinny_isa):
    x, w = torch.randn(M, D), torch.randn(O, D)
    out = torch.full((M, O), float("nan"))
    skinny_gemm(x, w, out_MO=out)
    # against the exact product: an fp32 matmul's own rounding (|x.w| ~ sqrt(D), D = 261: ~1e-5) is as large as
    # ours, and its summation order differs between ISAs
    exact = (x.double() @ w.double().t()).float()
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=4e-6 * D ** 0.5)


def test_strided_rows_write_into_a_slice():
    x_big, w_big = torch.randn(10, 50), torch.randn(40, 64)
    x, w = x_big[2:7, 3:35], w_big[5:30, :32]  # row strides 50 and 64, unit column stride
    y = torch.full((12, 25), float("nan"))
    skinny_gemm(x, w, out_MO=y[4:9])
    torch.testing.assert_close(y[4:9], x @ w.t(), rtol=1e-5, atol=1e-5)
    assert torch.isnan(y[:4]).all() and torch.isnan(y[9:]).all()


def test_avx2_tiles_context_says_what_it_changed_and_restores():
    """Outside the block the best tiles run again; a nested block changes nothing more."""
    from moe.kernels.cpu_gemm import skinny_gemm_avx2_tiles

    x, w = torch.randn(5, 37), torch.randn(29, 37)  # D=37: vector steps of 8 or 16 and a scalar tail
    native = skinny_gemm(x, w)
    with skinny_gemm_avx2_tiles() as changed:
        assert changed == block_gemm_has_avx512()
        with skinny_gemm_avx2_tiles() as changed_again:
            assert not changed_again
        avx2 = skinny_gemm(x, w)
    assert torch.equal(skinny_gemm(x, w), native)
    if changed:  # other summation order
        torch.testing.assert_close(avx2, native, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(avx2, native)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="disagree on D"):
        skinny_gemm(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="x_MD must be a CPU torch.float32"):
        skinny_gemm(torch.randn(2, 3).double(), torch.randn(4, 3))
    with pytest.raises(ValueError, match="unit-stride"):
        skinny_gemm(torch.randn(3, 2).t(), torch.randn(4, 3))


def _per_expert_matmul(x_RD, w_LOD, counts):
    """The grouped kernels' contract in torch: expert e's rows (sorted by expert) times ``w_LOD[e].T``."""
    starts = [sum(counts[:e]) for e in range(len(counts))]
    return torch.cat([x_RD[s:s + n] @ w_LOD[e].t() for e, (s, n) in enumerate(zip(starts, counts, strict=True))])


GROUPED_CASES = [([2, 0, 5], 13, 21), ([3, 1, 0, 7, 32, 2, 9, 4], 37, 29), ([1], 4, 8), ([0, 0], 8, 8)]
# Tails in every dimension of both micro-kernels (12 x 32 and 6 x 16 tiles, 8 x 8 packing transposes);
# D=4100: two k blocks (4096 + 4).
BLOCK_CASES = [([2, 0, 37], 13, 21), ([17, 33, 16], 100, 300), ([5], 6, 4100), ([25, 12, 6, 7], 64, 72),
               ([13, 40], 33, 17)]
# The AVX2 micro-kernel forced where the CPU also has AVX-512 (else the same kernel twice).
BLOCK_AVX2 = functools.partial(block_gemm_grouped, avx512=False)
BLOCK_KERNELS = [block_gemm_grouped] + ([BLOCK_AVX2] if block_gemm_has_avx512() else [])


@pytest.mark.parametrize("grouped, counts, O, D", [(skinny_gemm_grouped, *c) for c in GROUPED_CASES]
                         + [(k, *c) for k in BLOCK_KERNELS for c in GROUPED_CASES + BLOCK_CASES])
def test_grouped_matches_per_expert_matmul(grouped, counts, O, D, skinny_isa):
    w_LOD, counts_L = torch.randn(len(counts), O, D), torch.tensor(counts)
    x_RD = torch.randn(sum(counts), D)
    y = grouped(x_RD, w_LOD, counts_L)
    expected = _per_expert_matmul(x_RD, w_LOD, counts)
    tol = 1e-5 * max(1.0, (D / 100) ** 0.5)  # fp32 sums of D products: the rounding grows like sqrt(D)
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)


def test_grouped_refuses_counts_beyond_the_rows():
    for grouped in (skinny_gemm_grouped, block_gemm_grouped):
        with pytest.raises(ValueError, match="sum to at most the 3 rows"):
            grouped(torch.randn(3, 8), torch.randn(2, 4, 8), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="must be \\[2\\]"):
        skinny_gemm_grouped(torch.randn(3, 8), torch.randn(2, 4, 8), torch.tensor([3]))


def _step_by_step(x_TD, ids_TK, weights_TK, w13_EXD, w2_EDF, activation):
    """shuffle -> gather -> loop_ffn -> weighted_sum: the layer's path when decode_moe does not apply."""
    from all_to_all.dispatcher import inverse_permutation, weighted_sum
    from moe.backends import loop_ffn
    from moe.shuffle import shuffle

    shuf = shuffle(ids_TK, w13_EXD.shape[0])
    y_RD = loop_ffn(x_TD.index_select(0, shuf.token_idx_N), shuf.counts_E, w13_EXD, w2_EDF, activation)
    weights_N = weights_TK.reshape(-1)[shuf.order_N]
    return weighted_sum(y_RD, inverse_permutation(shuf.order_N), weights_N, x_TD.shape[0], False)


@pytest.mark.parametrize("T, D, F, E, K", [(1, 128, 128, 8, 2), (33, 48, 40, 8, 3), (222, 20, 12, 64, 2),
                                           (5, 21, 13, 4, 1)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_decode_moe_is_bit_identical_to_the_step_by_step_path(T, D, F, E, K, activation, skinny_isa):
    from moe.activations import ActivationSpec
    from moe.config import Activation
    from moe.kernels.cpu_gemm import decode_moe

    act = ActivationSpec(Activation(activation))  # what loop_ffn and the layer's decode_moe call take
    X = 2 * F if act.activation.gated else F
    x, w13, w2 = torch.randn(T, D), torch.randn(E, X, D) * D**-0.5, torch.randn(E, D, F) * F**-0.5
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int()
    ids[ids == 1] = 0 if E > 2 else ids[ids == 1]  # expert 1 gets no rows
    weights = torch.rand(T, K)
    y = decode_moe(x, ids, weights, w13, w2, act, max_rows=T * K)
    assert y is not None and torch.equal(y, _step_by_step(x, ids, weights, w13, w2, act))


def test_decode_moe_declines_many_rows_and_refuses_bad_ids():
    from moe.activations import expert_activation
    from moe.config import Activation
    from moe.kernels.cpu_gemm import decode_moe

    x, w13, w2 = torch.randn(4, 16), torch.randn(2, 16, 16), torch.randn(2, 16, 8)
    act = lambda h: expert_activation(h, Activation.SWIGLU)  # noqa: E731
    ids = torch.tensor([[0], [0], [0], [1]], dtype=torch.int32)
    assert decode_moe(x, ids, torch.ones(4, 1), w13, w2, act, max_rows=2) is None  # expert 0 has 3 rows
    with pytest.raises(ValueError, match="must be in \\[0, 2\\)"):
        decode_moe(x, ids + 1, torch.ones(4, 1), w13, w2, act, max_rows=8)


@pytest.mark.parametrize("avx512", [True, False] if block_gemm_has_avx512() else [True])
@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize("counts, O, D", [([30, 0, 77], 100, 300), ([13, 40], 256, 520), ([5], 33, 17),
                                          ([9, 3], 24, 4100)])  # D=4100: two k blocks, the second mid-scale-block
def test_grouped_fp8_block_gemm_matches_dequantised_matmul(counts, O, D, scheme, avx512):
    from moe.kernels.cpu_gemm import block_gemm_grouped_fp8
    from quant.fp8 import BLOCK, dequantize_weight, quantize_weight

    q, scale = quantize_weight(torch.randn(len(counts), O, D), scheme)
    block = 0 if scheme == "channel" else BLOCK
    w = dequantize_weight(q, scale, block or None)
    x_RD = torch.randn(sum(counts), D)
    y = block_gemm_grouped_fp8(x_RD, q, scale, block, torch.tensor(counts), avx512=avx512)
    expected = _per_expert_matmul(x_RD, w, counts)
    # the kernel folds 2^120 into the scale before multiplying (torch after): weights may differ by an ulp
    tol = 1e-4 * max(1.0, (D / 100) ** 0.5)
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)


def test_grouped_fp8_block_gemm_takes_views_of_halves():
    """Fp8Experts calls it per half of w13 (gate rows, up rows), each with its own rows of block scales."""
    from moe.kernels.cpu_gemm import block_gemm_grouped_fp8
    from quant.fp8 import BLOCK, dequantize_weight, quantize_weight

    halves = [quantize_weight(torch.randn(2, 136, 200), "block") for _ in range(2)]
    q, scale = torch.cat([h[0] for h in halves], 1), torch.cat([h[1] for h in halves], 1)  # [2, 272, 200], [2, 4, 2]
    x_RD, counts = torch.randn(50, 200), torch.tensor([20, 30])
    out = torch.full((50, 272), float("nan"))
    for h in range(2):
        block_gemm_grouped_fp8(x_RD, q[:, 136 * h:136 * (h + 1)], scale[:, 2 * h:2 * (h + 1)], BLOCK, counts,
                               out[:, 136 * h:136 * (h + 1)])
    w = torch.cat([dequantize_weight(qh, sh, BLOCK) for qh, sh in halves], 1)
    expected = _per_expert_matmul(x_RD, w, [20, 30])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_grouped_fp8_block_gemm_refuses_a_wrong_scale_grid():
    from moe.kernels.cpu_gemm import block_gemm_grouped_fp8
    from quant.fp8 import BLOCK, quantize_weight

    q, scale = quantize_weight(torch.randn(2, 136, 200), "block")
    with pytest.raises(ValueError, match=r"expected a CPU fp32 \(2, 2, 2\)"):
        block_gemm_grouped_fp8(torch.randn(4, 200), q, scale[:, :1], BLOCK, torch.tensor([2, 2]))


@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize("counts, O, D", [([3, 0, 7], 100, 300), ([1, 13], 256, 520), ([5], 33, 17),
                                          ([2, 6, 1, 0], 130, 136)])  # O=130: a scalar tail block of 2 rows
def test_grouped_fp8_skinny_gemm_matches_dequantised_matmul(counts, O, D, scheme, skinny_isa):
    from moe.kernels.cpu_gemm import skinny_gemm_grouped_fp8
    from quant.fp8 import BLOCK, dequantize_weight, quantize_weight

    q, scale = quantize_weight(torch.randn(len(counts), O, D), scheme)
    block = 0 if scheme == "channel" else BLOCK
    x_RD = torch.randn(sum(counts), D)
    y = skinny_gemm_grouped_fp8(x_RD, q, scale, block, torch.tensor(counts))
    expected = _per_expert_matmul(x_RD, dequantize_weight(q, scale, block or None), counts)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * max(1.0, (D / 100) ** 0.5))
