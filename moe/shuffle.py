"""MetaShuffling-style token shuffle: one stable counting sort of routed rows by expert, on the device.

Shape legend: T tokens, K top-k, E experts, N = T*K routed rows (row ``n = t*K + k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Shuffle:
    """Routed rows sorted by expert (stable: token order within an expert).

    - ``order_N`` (int64): the flat routed-row index ``n = t*K + k`` at each sorted position.
    - ``token_idx_N`` (int64): ``order_N // K``, the token each sorted row reads.
    - ``expert_of_N`` (int32): the expert of each sorted row (non-decreasing).
    - ``counts_E`` (int32): rows per expert; ``offsets_E1`` (int32, E+1): exclusive prefix sum, so expert
      ``e`` owns sorted rows ``offsets_E1[e]:offsets_E1[e+1]``.

    Example: ``ids_TK = [[1, 0], [1, 2]]``, E=3 -> ``order_N = [1, 0, 2, 3]``, ``token_idx_N = [0, 0, 1, 1]``,
    ``expert_of_N = [0, 1, 1, 2]``, ``counts_E = [1, 2, 1]``, ``offsets_E1 = [0, 1, 3, 4]``.
    """

    order_N: torch.Tensor
    token_idx_N: torch.Tensor
    expert_of_N: torch.Tensor
    counts_E: torch.Tensor
    offsets_E1: torch.Tensor


def shuffle(ids_TK: torch.Tensor, num_experts: int) -> Shuffle:
    """Stable sort of ``ids_TK``'s routed rows by expert. No host synchronisation."""
    K = ids_TK.shape[-1]
    flat_N = ids_TK.reshape(-1)
    expert_of_N, order_N = torch.sort(flat_N, stable=True)
    # scatter_add rather than bincount: bincount reads the max back to the host on CUDA.
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=ids_TK.device)
    counts_E.scatter_add_(0, flat_N.long(), torch.ones_like(flat_N, dtype=torch.int32))
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids_TK.device)
    torch.cumsum(counts_E, 0, out=offsets_E1[1:])
    return Shuffle(order_N, order_N // K, expert_of_N.to(torch.int32), counts_E, offsets_E1)
