"""The Triton index shuffle against ``moe.shuffle.shuffle`` and the reference: exact values, dtypes, shapes.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest before any kernel
module is imported, because Triton reads it when ``@triton.jit`` decorates).
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton = pytest.importorskip("triton")

from moe.kernels import index_shuffle as kernel_module  # noqa: E402
from moe.kernels.index_shuffle import index_shuffle  # noqa: E402
from moe.reference import reference_shuffle  # noqa: E402
from moe.shuffle import shuffle  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and isinstance(kernel_module._place_kernel, triton.runtime.JITFunction):
    raise RuntimeError("moe.kernels was imported before TRITON_INTERPRET=1 was set: kernels cannot run on CPU")


def _ids(T, E, K, empty_expert=True, dtype=torch.int32):
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(dtype)
    if empty_expert:
        ids[ids == E - 1] = 0  # expert E-1 gets no rows (a repeated pick is fine for the sort)
    return ids.to(DEVICE)


def _assert_same_as_torch_shuffle(ids, E, **kwargs):
    got = index_shuffle(ids, E, **kwargs)
    s = shuffle(ids, E)
    for name, a, b in zip(("order", "token_idx", "expert_of", "counts", "offsets"), got,
                          (s.order_N, s.token_idx_N, s.expert_of_N, s.counts_E, s.offsets_E1), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    return got


def test_docstring_example():
    got = index_shuffle(torch.tensor([[1, 0], [1, 2]], dtype=torch.int32, device=DEVICE), 3)
    expected = ([1, 0, 2, 3], [0, 0, 1, 1], [0, 1, 1, 2], [1, 2, 1], [0, 1, 3, 4])
    dtypes = (torch.int64, torch.int64, torch.int32, torch.int32, torch.int32)
    for a, values, dtype in zip(got, expected, dtypes, strict=True):
        assert torch.equal(a, torch.tensor(values, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("T", [1, 33, 222])
@pytest.mark.parametrize("E, K", [(4, 1), (8, 2), (8, 3)])
def test_matches_reference_single_launch(T, E, K):
    ids = _ids(T, E, K)
    order, token_idx, expert_of, counts, offsets = _assert_same_as_torch_shuffle(ids, E)
    ref_token_idx, ref_expert_of, ref_counts = reference_shuffle(ids.cpu(), E)
    assert torch.equal(token_idx.cpu().to(torch.int32), ref_token_idx)
    assert torch.equal(expert_of.cpu(), ref_expert_of)
    assert torch.equal(counts.cpu(), ref_counts)
    assert counts[E - 1].item() == 0


@pytest.mark.parametrize("T, E, K, rows", [(222, 8, 3, 16), (222, 4, 1, 64), (100, 256, 8, 32), (33, 8, 2, 16)])
def test_multi_program_path(T, E, K, rows):
    """Chunked path (histograms, column scan over chunks, placement) with many small chunks."""
    _assert_same_as_torch_shuffle(_ids(T, E, K), E, rows_per_program=rows)


def test_default_multi_program_path_for_large_n():
    _assert_same_as_torch_shuffle(_ids(1500, 16, 3), 16)  # N * 16 > 2**16: three launches


def test_int64_ids_many_experts_and_all_rows_on_one_expert():
    _assert_same_as_torch_shuffle(_ids(33, 1000, 3, dtype=torch.int64), 1000)
    _assert_same_as_torch_shuffle(torch.zeros(50, 2, dtype=torch.int32, device=DEVICE), 5)


def test_zero_tokens():
    order, token_idx, expert_of, counts, offsets = index_shuffle(
        torch.empty(0, 2, dtype=torch.int32, device=DEVICE), 4
    )
    assert order.shape == (0,) and torch.equal(counts.cpu(), torch.zeros(4, dtype=torch.int32))
    assert torch.equal(offsets.cpu(), torch.zeros(5, dtype=torch.int32))


@pytest.mark.parametrize(
    "ids, E, kwargs, match",
    [
        (torch.zeros(4, dtype=torch.int32), 4, {}, "2-D"),
        (torch.zeros(4, 2, dtype=torch.float32), 4, {}, "int32 or int64"),
        (torch.zeros(2, 4, dtype=torch.int32).t(), 4, {}, "contiguous"),
        (torch.zeros(4, 2, dtype=torch.int32), 2000, {}, r"num_experts \(2000\)"),
        (torch.zeros(4, 2, dtype=torch.int32), 4, {"rows_per_program": 24}, r"rows_per_program \(24\)"),
    ],
)
def test_rejects_bad_input(ids, E, kwargs, match):
    with pytest.raises(ValueError, match=match):
        index_shuffle(ids, E, **kwargs)
