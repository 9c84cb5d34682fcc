"""The grouped-GEMM kernels one by one: docstring examples, pinned awkward tile configs, input validation.

On CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest before any kernel module is
imported); fp32 and fp16 only there (its bf16 ``tl.dot`` is wrong, triton#11584). Every ``torch.empty`` is
NaN/-7 poisoned during these tests, so anything a kernel fails to write shows up.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from moe.config import Activation  # noqa: E402
from moe.kernels import gemm_act as gemm_act_module  # noqa: E402
from moe.kernels.gemm_act import gemm_act  # noqa: E402
from moe.kernels.gemm_combine import gemm_combine  # noqa: E402
from moe.kernels.index_shuffle import index_shuffle  # noqa: E402
from moe.kernels.schedule import (  # noqa: E402
    GemmConfig,
    all_candidates,
    candidates,
    default_config,
    max_row_tiles,
    program_tile,
    prune_for_bucket,
    rows_bucket,
)
from moe.reference import reference_expert, reference_moe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and isinstance(gemm_act_module._gemm_act_kernel, triton.runtime.JITFunction):
    raise RuntimeError("moe.kernels was imported before TRITON_INTERPRET=1 was set: kernels cannot run on CPU")


pytestmark = pytest.mark.usefixtures("poison_empty")  # anything a kernel fails to write shows up


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def test_gemm_act_docstring_example():
    h_NF = gemm_act(_t([[1.0, 2.0]]), _t([0], torch.int64), _t([0], torch.int64), _t([1], torch.int32),
                    _t([[[1.0, 0.0], [0.0, 1.0]]]))
    assert torch.allclose(h_NF, _t([[1.4621]]), atol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True])
def test_gemm_combine_docstring_example(deterministic):
    y_TD = gemm_combine(_t([[4.0], [8.0]]), _t([0, 0], torch.int64), _t([0, 1], torch.int64), _t([1, 1], torch.int32),
                        _t([[[1.0]], [[1.0]]]), _t([[0.25, 0.75]]), deterministic=deterministic)
    assert torch.equal(y_TD, _t([[7.0]]))


def _routed(T, E, K, D, F, dtype, gated=True):
    x_TD = torch.randn(T, D, device=DEVICE).to(dtype)
    ids_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32).to(DEVICE)
    ids_TK[ids_TK == E - 1] = 0  # expert E-1 has no rows
    weights_TK = torch.rand(T, K, device=DEVICE)
    w13 = (0.2 * torch.randn(E, 2 * F if gated else F, D, device=DEVICE)).to(dtype)
    w2 = (0.2 * torch.randn(E, D, F, device=DEVICE)).to(dtype)
    return x_TD, ids_TK, weights_TK, w13, w2


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_clamped", "gelu"])
def test_gemm_act_rows_match_reference_expert(activation):
    """``h_NF`` of each expert's rows = the reference expert with an identity second projection."""
    T, E, K, D, F = 33, 4, 2, 48, 40
    x_TD, ids_TK, _, w13, _ = _routed(T, E, K, D, F, torch.float32, gated=Activation(activation).gated)
    order, token_idx, _, counts, offsets = index_shuffle(ids_TK, E)
    h_NF = gemm_act(x_TD, token_idx, order, counts, w13, activation, limit=0.5)  # a limit the clamps reach
    eye_FF = torch.eye(F, device=DEVICE)
    for e in range(E):
        rows = slice(offsets[e].item(), offsets[e + 1].item())
        expected = reference_expert(x_TD[token_idx[rows]], w13[e], eye_FF, Activation(activation), limit=0.5)
        torch.testing.assert_close(h_NF[rows], expected, rtol=1e-5, atol=1e-5)
    assert not h_NF.isnan().any()


TILES = [GemmConfig(16, 16, 16, group_m=2, num_stages=2), GemmConfig(32, 32, 32, group_m=1)]


@pytest.mark.parametrize("tile", TILES, ids=["16x16x16-group2", "32x32x32"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_pinned_tiles_cover_partial_tiles(tile, deterministic):
    """Several column tiles, several K steps and partial tiles in every dimension (D=48, F=40)."""
    T, E, K, D, F = 33, 8, 3, 48, 40
    x_TD, ids_TK, weights_TK, w13, w2 = _routed(T, E, K, D, F, torch.float32)
    order, token_idx, _, counts, _ = index_shuffle(ids_TK, E)
    h_NF = gemm_act(x_TD, token_idx, order, counts, w13, config=tile)
    y_TD = gemm_combine(h_NF, token_idx, order, counts, w2, weights_TK, deterministic=deterministic, config=tile)
    expected = reference_moe(x_TD, weights_TK, ids_TK, w13, w2)
    torch.testing.assert_close(y_TD, expected, rtol=1e-5, atol=1e-5)


@triton.jit
def _program_tile_probe(counts_ptr, out_ptr, E, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        GROUP_M: tl.constexpr, E_POW2: tl.constexpr):
    """Writes each program's ``program_tile`` as one row: valid, expert, col_tile, cols[0], sum(col_ok), rows,
    row_ok."""
    valid, expert, rows, row_ok, cols, col_ok, col_tile = program_tile(counts_ptr, E, num_cols, BLOCK_M, BLOCK_N,
                                                                       GROUP_M, E_POW2)
    out = out_ptr + tl.program_id(0) * (5 + 2 * BLOCK_M)
    tl.store(out, valid.to(tl.int32))
    tl.store(out + 1, expert)
    tl.store(out + 2, col_tile)
    tl.store(out + 3, tl.min(cols, axis=0))
    tl.store(out + 4, tl.sum(col_ok.to(tl.int32), axis=0))
    m = tl.arange(0, BLOCK_M)
    tl.store(out + 5 + m, rows)
    tl.store(out + 5 + BLOCK_M + m, row_ok.to(tl.int32))


def test_program_tile_docstring_example():
    counts_E, block_m, block_n = _t([3, 0, 5], torch.int32), 4, 16
    slots = max_row_tiles(8, 3, block_m)
    assert slots == 5
    out = torch.full((slots, 5 + 2 * block_m), -7, dtype=torch.int32, device=DEVICE)
    _program_tile_probe[(slots,)](counts_E, out, 3, block_n, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=1, E_POW2=16)
    out = out.cpu()
    assert out[:, 0].tolist() == [1, 1, 1, 0, 0]
    #                      expert, col_tile, cols[0], sum(col_ok), rows,          row_ok
    assert out[0, 1:].tolist() == [0, 0, 0, 16, 0, 1, 2, 3, 1, 1, 1, 0]
    assert out[1, 1:].tolist() == [2, 0, 0, 16, 3, 4, 5, 6, 1, 1, 1, 1]
    assert out[2, 1:].tolist() == [2, 0, 0, 16, 7, 8, 9, 10, 1, 0, 0, 0]


def test_tile_schedule_bound_and_buckets():
    for rows, experts, block_m in [(1, 8, 16), (33, 4, 16), (666, 8, 64), (131072, 256, 128)]:
        splits = [torch.bincount(torch.randint(experts, (rows,)), minlength=experts) for _ in range(20)]
        used = min(experts, rows)  # adversarial: one row past a tile boundary on every used expert
        splits.append(torch.tensor([1] * (used - 1) + [rows - used + 1]))
        q = (rows // used - 1) // block_m
        splits.append(torch.tensor([q * block_m + 1] * (used - 1) + [rows - (used - 1) * (q * block_m + 1)]))
        worst = max(sum(triton.cdiv(int(c), block_m) for c in split) for split in splits)
        assert all(int(split.sum()) == rows and int(split.min()) >= 0 for split in splits)
        assert max_row_tiles(rows, experts, block_m) >= worst
    assert rows_bucket(1, 256) == 1 and rows_bucket(16384 * 8, 256) == 512 and rows_bucket(2**30, 1) == 65536
    assert default_config(1, 1).block_m == 16 and default_config(2, 4096).block_m == 128
    assert all(c.block_m >= 16 and c.block_n >= 16 for b in (1, 64, 4096) for c in candidates(1, b))
    every = [c.triton_config() for c in all_candidates(2)]  # what the autotuner holds; pruned per call
    for bucket in (1, 64, 4096):
        kept = prune_for_bucket(2)(every, {"M_BUCKET": bucket})
        wanted = [c.triton_config() for c in candidates(2, bucket)]
        assert len(kept) == len(wanted) and set(kept) == set(wanted)


def _index_inputs(N=4, E=2):
    z64 = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    return z64, z64.clone(), torch.zeros(E, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(activation="silu"), r"activation \('silu'\)"),
        (dict(x_TD=torch.zeros(2, 7)), r"x_TD \(2, 7\)"),
        (dict(x_TD=torch.zeros(2, 8, dtype=torch.float16)), r"x_TD \(torch.float16\)"),
        (dict(w13_EXD=torch.zeros(2, 5, 8)), "even number of w13 rows, got 5"),
        (dict(counts_E=torch.zeros(3, dtype=torch.int32)), r"counts_E \(torch.int32, \(3,\)\)"),
        (dict(b13_EX=torch.zeros(2, 3)), r"b13_EX \(2, 3\)"),
        (dict(topk_weights_TK=torch.zeros(2, 3)), "N=4 elements"),
    ],
)
def test_gemm_act_rejects_bad_input(change, match):
    token_idx, order, counts = _index_inputs()
    args = dict(x_TD=torch.zeros(2, 8), token_idx_N=token_idx, order_N=order, counts_E=counts,
                w13_EXD=torch.zeros(2, 6, 8))
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in {**args, **change}.items()}
    with pytest.raises(ValueError, match=match):
        gemm_act(**args)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(h_NF=torch.zeros(4, 5)), r"h_NF \(4, 5\)"),
        (dict(w2_EDF=torch.zeros(2, 8, 3, dtype=torch.float16)), r"w2_EDF \(torch.float16\)"),
        (dict(order_N=torch.zeros(4, dtype=torch.int32)), r"order_N \(torch.int32"),
        (dict(topk_weights_TK=torch.zeros(3, 2)), "T\\*K = N = 4"),
        (dict(b2_ED=torch.zeros(2, 3)), r"b2_ED \(2, 3\)"),
    ],
)
def test_gemm_combine_rejects_bad_input(change, match):
    token_idx, order, counts = _index_inputs()
    args = dict(h_NF=torch.zeros(4, 3), token_idx_N=token_idx, order_N=order, counts_E=counts,
                w2_EDF=torch.zeros(2, 8, 3), topk_weights_TK=torch.zeros(2, 2))
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in {**args, **change}.items()}
    with pytest.raises(ValueError, match=match):
        gemm_combine(**args)
