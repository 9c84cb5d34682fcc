"""The token shuffle against the reference counting sort: exact indices, dtypes and shapes."""

import pytest
import torch

from moe.reference import reference_shuffle
from moe.shuffle import shuffle


def test_docstring_example():
    s = shuffle(torch.tensor([[1, 0], [1, 2]], dtype=torch.int32), 3)
    assert torch.equal(s.order_N, torch.tensor([1, 0, 2, 3]))
    assert torch.equal(s.token_idx_N, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(s.expert_of_N, torch.tensor([0, 1, 1, 2], dtype=torch.int32))
    assert torch.equal(s.counts_E, torch.tensor([1, 2, 1], dtype=torch.int32))
    assert torch.equal(s.offsets_E1, torch.tensor([0, 1, 3, 4], dtype=torch.int32))


@pytest.mark.parametrize("T", [1, 33, 222])
@pytest.mark.parametrize("E, K", [(4, 1), (8, 2), (8, 3)])
def test_matches_reference(T, E, K):
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
    ids[ids == E - 1] = 0  # expert E-1 gets no rows (duplicate picks are fine for the sort)
    token_idx, expert_of, counts = reference_shuffle(ids, E)
    s = shuffle(ids, E)
    assert torch.equal(s.token_idx_N.to(torch.int32), token_idx)
    assert torch.equal(s.expert_of_N, expert_of)
    assert torch.equal(s.counts_E, counts)
    assert counts[E - 1] == 0
    assert torch.equal(s.offsets_E1[1:], torch.cumsum(counts, 0, dtype=torch.int32))
    assert s.order_N.shape == (T * K,)
