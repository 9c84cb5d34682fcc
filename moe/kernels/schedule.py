"""The tile schedule and tile configs shared by the grouped GEMMs (bf16/fp16/fp32 and FP8).

Shape legend: N routed rows sorted by expert, E experts, M rows of one expert, T tokens, K top-k.

Schedule: block-aligned static grid, tiles found on the device
---------------------------------------------------------------
Each expert's rows ``offsets[e] .. offsets[e] + counts[e]`` are cut into ``ceil(counts[e] / BLOCK_M)``
row tiles. The grid has ``N // BLOCK_M + min(E, N)`` row-tile slots, a static upper bound of
``sum_e ceil(counts[e] / BLOCK_M)``, times the column tiles. A program turns its slot into (expert, tile)
from ``counts_E`` in registers: per-expert tile counts, a cumulative sum over ``E_POW2`` lanes and one
compare, O(E) register work. Slots past the last real tile return at once. :func:`program_tile` is that
whole prologue (slot, expert, row and column offsets and masks); every grouped-GEMM kernel starts with it.

Why this and not a persistent grid or vLLM-style padding:

- The grid depends on shapes only, never on counts: no host sync, CUDA-graph capturable, and any expert
  may have zero rows (it simply owns zero tiles).
- No padded index buffers: vLLM's ``moe_align_block_size`` materialises ``N + E*(BLOCK_M-1)`` sorted ids
  per BLOCK_M and an extra launch; here both GEMMs (with different BLOCK_M) read the same ``counts_E``.
- Decode (T <= 64) is memory-bound with about one row tile per active expert: every (tile, column) program
  starts at once and streams its slice of the expert's weights; a persistent loop would only serialise
  tiles behind a per-tile search, and it needs the SM count at launch.
- Prefill: the hardware block scheduler keeps the SMs busy; the wasted slots are at most ``min(E, N)``
  per column and return after the O(E) lookup (an estimate, not yet measured on a GPU). A persistent,
  warp-specialised TMA kernel is the natural next step on Hopper and would reuse this tile lookup.

Tiles are ordered with GROUP_M swizzling so that programs running together share a weight column tile
across the row tiles of one expert (L2 reuse in prefill).

Tile configs: a small default table keyed on the bucketed token count per expert
------------------------------------------------------------------------------------
``rows_bucket(N, E) = next_pow2(ceil(T*K/E))`` is the row count a typical active expert sees, i.e. the
token count bucketed and scaled by K/E. :func:`default_config` maps it to a tile config; with
``autotune=True`` (GPU only) the launchers benchmark :func:`candidates` (the table's neighbours) once per
(bucket, shapes, dtype) with ``triton.autotune`` and cache the winner in-process. No per-device files.
Deterministic mode uses :data:`BATCH_INVARIANT` for every T, so a row's result never depends on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import triton
import triton.language as tl

MAX_ROWS_BUCKET = 65536


@dataclass(frozen=True)
class GemmConfig:
    """One tile config. ``block_n`` counts output columns (for GEMM 1: per gate/up half)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m)

    def triton_config(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


# (max rows bucket, GEMM 1 config, GEMM 2 config). GEMM 1 keeps two accumulators (gate and up), so its
# block_n is half of GEMM 2's at the same register budget. Small buckets stream weights (memory-bound):
# small BLOCK_M, deep K tiles, many column tiles to cover the SMs. Large buckets are compute-bound.
_TABLE = (
    (16, GemmConfig(16, 64, 128, 1, 4, 4), GemmConfig(16, 64, 128, 1, 4, 4)),
    (32, GemmConfig(32, 64, 128, 1, 4, 4), GemmConfig(32, 64, 128, 1, 4, 4)),
    (128, GemmConfig(64, 64, 64, 8, 4, 4), GemmConfig(64, 128, 64, 8, 4, 4)),
    (MAX_ROWS_BUCKET, GemmConfig(128, 64, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 8, 3)),
)
BATCH_INVARIANT = (GemmConfig(64, 64, 64, 8, 4, 3), GemmConfig(64, 64, 64, 8, 4, 3))


def rows_bucket(num_rows: int, num_experts: int) -> int:
    """Rows per expert on average (``N / E = T * K / E``), rounded up to a power of two: the autotune key."""
    return min(triton.next_power_of_2(triton.cdiv(max(num_rows, 1), num_experts)), MAX_ROWS_BUCKET)


def default_config(gemm: int, bucket: int) -> GemmConfig:
    """The table's config for GEMM ``gemm`` (1 or 2) at ``bucket`` rows per expert."""
    for max_bucket, cfg1, cfg2 in _TABLE:
        if bucket <= max_bucket:
            return cfg1 if gemm == 1 else cfg2
    _, last1, last2 = _TABLE[-1]
    return last1 if gemm == 1 else last2


def candidates(gemm: int, bucket: int) -> list[GemmConfig]:
    """Autotune candidates: the table's pick, its neighbour rows, and narrower/wider column tiles."""
    base = default_config(gemm, bucket)
    found = [
        base,
        default_config(gemm, max(1, bucket // 4)),
        default_config(gemm, bucket * 4),
        replace(base, block_n=max(32, base.block_n // 2)),
        replace(base, block_n=min(256, base.block_n * 2), num_warps=8),
        replace(base, num_stages=base.num_stages + 1),
    ]
    return list(dict.fromkeys(found))  # unique, order kept


def all_candidates(gemm: int) -> list[GemmConfig]:
    buckets = [2**i for i in range(MAX_ROWS_BUCKET.bit_length())]
    return list(dict.fromkeys(c for b in buckets for c in candidates(gemm, b)))


def prune_for_bucket(gemm: int):
    """``early_config_prune`` for ``triton.autotune``: keep the candidates of the call's ``M_BUCKET``."""

    def prune(configs, named_args, **kwargs):
        bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET"))
        wanted = {c.triton_config() for c in candidates(gemm, bucket)}
        return [c for c in configs if c in wanted]

    return prune


def max_row_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static bound on ``sum_e ceil(counts[e] / block_m)`` over every split of ``num_rows`` rows."""
    return num_rows // block_m + min(num_experts, num_rows)


@triton.jit
def grouped_tile(pid, num_row_slots, num_col_tiles, GROUP_M: tl.constexpr):
    """Program id -> (row slot, column tile), GROUP_M row slots at a time for L2 reuse of weight tiles."""
    in_group = GROUP_M * num_col_tiles
    first_slot = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_row_slots - first_slot, GROUP_M)
    slot = first_slot + (pid % in_group) % group_rows
    col_tile = (pid % in_group) // group_rows
    return slot, col_tile


@triton.jit
def expert_tile(slot, counts_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Row slot -> (expert, first row, end row, real tiles). Rows are ``first + arange(BLOCK_M) < end``; a slot
    ``>=`` the number of real tiles has no work."""
    e_idx = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + e_idx, mask=e_idx < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_ends <= slot).to(tl.int32), axis=0)
    before = e_idx < expert
    tile_in_expert = slot - tl.sum(tl.where(before, tiles, 0), axis=0)
    expert_start = tl.sum(tl.where(before, counts, 0), axis=0)
    expert_rows = tl.sum(tl.where(e_idx == expert, counts, 0), axis=0)
    return expert, expert_start + tile_in_expert * BLOCK_M, expert_start + expert_rows, tl.sum(tiles, axis=0)


@triton.jit
def program_tile(counts_ptr, E, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                 E_POW2: tl.constexpr):
    """This program's tile of a grouped GEMM with ``num_cols`` output columns, the prologue of all four kernels:
    ``(valid, expert, rows, row_ok, cols, col_ok, col_tile)``. ``rows [BLOCK_M]`` are sorted-row indices
    inside ``expert``'s rows (``row_ok`` masks the tail), ``cols [BLOCK_N]`` output columns (``col_ok``).
    ``valid`` is false for slots past the last real tile: the caller returns before loading anything.

    Example: counts_E = [3, 0, 5], BLOCK_M = 4, num_cols = BLOCK_N (one column tile), GROUP_M = 1. The grid
    has 8 // 4 + 3 = 5 slots; expert 0 owns slot 0 (rows 0..3, row_ok = [1, 1, 1, 0]), expert 2 slots 1 and 2
    (rows 3..6 and 7..10, the second with row_ok = [1, 0, 0, 0]); slots 3 and 4 are not valid.
    """
    num_col_tiles = tl.cdiv(num_cols, BLOCK_N)
    slot, col_tile = grouped_tile(tl.program_id(0), tl.num_programs(0) // num_col_tiles, num_col_tiles, GROUP_M)
    expert, row_start, row_end, num_tiles = expert_tile(slot, counts_ptr, E, BLOCK_M, E_POW2)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    return slot < num_tiles, expert, rows, rows < row_end, cols, cols < num_cols, col_tile


def autotuned(kernel, gemm: int, restore_value: list[str] | None = None):
    """``kernel`` wrapped in ``triton.autotune`` over every bucket's candidates, pruned per call to its
    ``M_BUCKET``. Under the interpreter there is nothing to time: returns None and the table is used."""
    if not isinstance(kernel, triton.runtime.JITFunction):
        return None
    return triton.autotune(
        configs=[c.triton_config() for c in all_candidates(gemm)],
        key=["M_BUCKET", "E", "D", "F"],
        prune_configs_by={"early_config_prune": prune_for_bucket(gemm)},
        restore_value=restore_value,
    )(kernel)


def launch_grouped(kernel, tuned, gemm: int, args: tuple, num_rows: int, num_experts: int, num_cols: int,
                   config: GemmConfig | None, autotune: bool, **constexprs) -> None:
    """Launch a grouped GEMM over its static grid; ``args`` end just before ``M_BUCKET``.

    Tile config: ``config`` if given, else the autotuner (``autotune`` and compiled), else the table.
    Autotuning benchmarks on the first call per key: run once eagerly before capturing a CUDA graph.
    """
    bucket = rows_bucket(num_rows, num_experts)

    def grid(meta):
        return (max_row_tiles(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(num_cols, meta["BLOCK_N"]),)

    if config is None and autotune and tuned is not None:
        tuned[grid](*args, bucket, **constexprs)
        return
    cfg = config if config is not None else default_config(gemm, bucket)
    kernel[grid](*args, bucket, **constexprs, **cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
