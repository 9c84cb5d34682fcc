"""Device-side MetaShuffling index shuffle: ``topk_ids_TK`` -> routed rows stably sorted by expert.

Shape legend: T tokens, K top-k, E experts, N = T*K routed rows (row ``n = t*K + k``), C row chunks.

One stable counting sort with static shapes and no host sync. A program owns a chunk of consecutive rows
and writes row ``n`` of expert ``e`` to ``offsets[e] + (rows of e in earlier chunks) + (rows of e before n
in this chunk)``. The in-chunk rank comes from a cumulative sum over a one-hot ``[SUB, E]`` block, so it is
exact and stable; the cost is O(N * E) simple integer work, spread over the chunks.

- Small N (``N * E_POW2 <= 2**16``: decode, Mixtral-sized prefill): **one launch**, a single program
  counts, scans and places.
- Larger N: **three launches**: per-chunk histograms ``hist_CE``; a column scan over chunks (exclusive
  prefix per expert, and ``counts_E``); placement.

Example (identical to ``moe.shuffle.shuffle``): ``ids_TK = [[1, 0], [1, 2]]``, E=3 ->
``order_N = [1, 0, 2, 3]``, ``token_idx_N = [0, 0, 1, 1]``, ``expert_of_N = [0, 1, 1, 2]``,
``counts_E = [1, 2, 1]``, ``offsets_E1 = [0, 1, 3, 4]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 1024  # the one-hot block is [SUB, next_pow2(E)]; beyond this it no longer fits in registers
_WORK_PER_PROGRAM = 2**16  # one-hot elements a program handles (sets the single-launch limit and chunk size)
_ONEHOT_ELEMS = 2**13  # elements of one [SUB, E_POW2] block


@triton.jit
def _onehot(ids_ptr, start, N, E, SUB: tl.constexpr, E_POW2: tl.constexpr):
    """Rows ``start .. start+SUB``: their index, expert (-1 if padding or out of range) and one-hot [SUB, E_POW2]."""
    n = start + tl.arange(0, SUB)
    ids = tl.load(ids_ptr + n, mask=n < N, other=-1).to(tl.int32)
    ids = tl.where((ids >= 0) & (ids < E), ids, -1)
    onehot = (ids[:, None] == tl.arange(0, E_POW2)[None, :]).to(tl.int32)
    return n, ids, onehot


@triton.jit
def _chunk_counts(ids_ptr, start, rows, N, E, SUB: tl.constexpr, E_POW2: tl.constexpr):
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for s in range(start, start + rows, SUB):
        _, _, onehot = _onehot(ids_ptr, s, N, E, SUB, E_POW2)
        counts += tl.sum(onehot, axis=0)
    return counts


@triton.jit
def _chunk_hist_kernel(ids_ptr, hist_ptr, N, E, rows_per_prog, SUB: tl.constexpr, E_POW2: tl.constexpr):
    c = tl.program_id(0)
    counts = _chunk_counts(ids_ptr, c * rows_per_prog, rows_per_prog, N, E, SUB, E_POW2)
    tl.store(hist_ptr + c * E_POW2 + tl.arange(0, E_POW2), counts)


@triton.jit
def _scan_hist_kernel(
    hist_ptr, counts_ptr, C, E, E_POW2: tl.constexpr, E_BLOCK: tl.constexpr, C_BLOCK: tl.constexpr
):
    """In place: ``hist[c, e]`` -> rows of expert e in chunks before c; also ``counts_E``."""
    e_idx = tl.program_id(0) * E_BLOCK + tl.arange(0, E_BLOCK)
    carry = tl.zeros([E_BLOCK], dtype=tl.int32)
    for c0 in range(0, C, C_BLOCK):
        cs = c0 + tl.arange(0, C_BLOCK)
        offs = cs[:, None] * E_POW2 + e_idx[None, :]
        in_range = (cs < C)[:, None]
        h = tl.load(hist_ptr + offs, mask=in_range, other=0)
        tl.store(hist_ptr + offs, tl.cumsum(h, axis=0) - h + carry[None, :], mask=in_range)
        carry += tl.sum(h, axis=0)
    tl.store(counts_ptr + e_idx, carry, mask=e_idx < E)


@triton.jit
def _place_kernel(
    ids_ptr, prefix_ptr, order_ptr, token_ptr, expert_ptr, counts_ptr, offsets_ptr,
    N, E, K, rows_per_prog,
    SUB: tl.constexpr, E_POW2: tl.constexpr, SINGLE: tl.constexpr,
):
    c = tl.program_id(0)
    start = c * rows_per_prog
    e_idx = tl.arange(0, E_POW2)
    # 1. rows per expert in all chunks (total) and in the chunks before this one (before)
    if SINGLE:
        total = _chunk_counts(ids_ptr, start, rows_per_prog, N, E, SUB, E_POW2)
        before = tl.zeros([E_POW2], dtype=tl.int32)
        tl.store(counts_ptr + e_idx, total, mask=e_idx < E)
    else:
        total = tl.load(counts_ptr + e_idx, mask=e_idx < E, other=0)
        before = tl.load(prefix_ptr + c * E_POW2 + e_idx)
    ends = tl.cumsum(total, axis=0)
    writes = tl.where(c == 0, E, 0)  # program 0 writes the offsets
    tl.store(offsets_ptr + e_idx, tl.zeros([E_POW2], dtype=tl.int32), mask=e_idx < tl.minimum(writes, 1))
    tl.store(offsets_ptr + 1 + e_idx, ends, mask=e_idx < writes)
    # 2. place each sub-block: base of its expert + stable rank among equal experts in the sub-block
    base = ends - total + before
    for s in range(start, start + rows_per_prog, SUB):
        n, ids, onehot = _onehot(ids_ptr, s, N, E, SUB, E_POW2)
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        pos = tl.sum(base[None, :] * onehot, axis=1) + rank
        valid = ids >= 0
        tl.store(order_ptr + pos, n.to(tl.int64), mask=valid)
        tl.store(token_ptr + pos, (n // K).to(tl.int64), mask=valid)
        tl.store(expert_ptr + pos, ids, mask=valid)
        base += tl.sum(onehot, axis=0)


def _check_ids(topk_ids_TK: torch.Tensor, num_experts: int) -> None:
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"topk_ids_TK must be 2-D [T, K], got shape {tuple(topk_ids_TK.shape)}")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids_TK must be int32 or int64, got {topk_ids_TK.dtype}")
    if not topk_ids_TK.is_contiguous():
        raise ValueError(f"topk_ids_TK must be contiguous, got strides {topk_ids_TK.stride()}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts ({num_experts}) must be in [1, {MAX_EXPERTS}] for the Triton shuffle")
    if topk_ids_TK.numel() >= 2**31:
        raise ValueError(f"topk_ids_TK has {topk_ids_TK.numel()} rows; at most 2**31 - 1 are supported")


def index_shuffle(
    topk_ids_TK: torch.Tensor, num_experts: int, rows_per_program: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of routed rows by expert on the device: ``(order_N, token_idx_N, expert_of_N, counts_E,
    offsets_E1)`` with the dtypes and values of :func:`moe.shuffle.shuffle` (int64, int64, int32, int32,
    int32). Ids must lie in ``[0, E)``; rows with other ids are left out of the counts (memory-safe, but the
    tail of the sorted outputs is then unwritten).

    ``rows_per_program`` (a power of two >= 16) forces the multi-program path with that chunk size, for
    tests; by default it is chosen from N and E.
    """
    _check_ids(topk_ids_TK, num_experts)
    T, K = topk_ids_TK.shape
    N, E, dev = T * K, num_experts, topk_ids_TK.device
    order_N = torch.empty(N, dtype=torch.int64, device=dev)
    token_idx_N = torch.empty(N, dtype=torch.int64, device=dev)
    expert_of_N = torch.empty(N, dtype=torch.int32, device=dev)
    counts_E = torch.empty(E, dtype=torch.int32, device=dev)
    offsets_E1 = torch.empty(E + 1, dtype=torch.int32, device=dev)
    if N == 0:
        counts_E.zero_()
        offsets_E1.zero_()
        return order_N, token_idx_N, expert_of_N, counts_E, offsets_E1

    E_POW2 = max(16, triton.next_power_of_2(E))
    SUB = min(1024, _ONEHOT_ELEMS // E_POW2)
    single = rows_per_program is None and N * E_POW2 <= _WORK_PER_PROGRAM
    if single:
        rows, C = triton.cdiv(N, SUB) * SUB, 1
    elif rows_per_program is None:
        rows = max(SUB, _WORK_PER_PROGRAM // E_POW2)
        C = triton.cdiv(N, rows)
    else:
        rows = rows_per_program
        if rows < 16 or rows & (rows - 1):
            raise ValueError(f"rows_per_program ({rows}) must be a power of two >= 16")
        SUB, C = min(SUB, rows), triton.cdiv(N, rows)
    prefix_CE = counts_E  # unused placeholder pointer in the single-program path
    if not single:
        prefix_CE = torch.empty(C, E_POW2, dtype=torch.int32, device=dev)
        _chunk_hist_kernel[(C,)](topk_ids_TK, prefix_CE, N, E, rows, SUB=SUB, E_POW2=E_POW2)
        E_BLOCK = 16
        _scan_hist_kernel[(E_POW2 // E_BLOCK,)](
            prefix_CE, counts_E, C, E, E_POW2=E_POW2, E_BLOCK=E_BLOCK, C_BLOCK=64
        )
    _place_kernel[(C,)](
        topk_ids_TK, prefix_CE, order_N, token_idx_N, expert_of_N, counts_E, offsets_E1,
        N, E, K, rows, SUB=SUB, E_POW2=E_POW2, SINGLE=single, num_warps=4 if E_POW2 <= 64 else 8,
    )
    return order_N, token_idx_N, expert_of_N, counts_E, offsets_E1
