"""Block pool bookkeeping: allocation, ref counts, prefix caching by chained block hashes, copy-on-write, LRU."""

from __future__ import annotations

import torch

from serve.engine.block_manager import BlockManager, block_key
from serve.engine.sampling_params import SamplingParams
from serve.engine.sequence import Sequence
from serve.models import DecoderConfig
from serve.models.attention import PagedKVCache


def _seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, tokens, SamplingParams(), 0)


def _admit(bm: BlockManager, seq: Sequence) -> int:
    hits = bm.match_prefix(seq)
    n = seq.num_tokens - bm.cached_tokens(seq, hits)
    assert bm.can_admit(seq, hits, n)
    seq.num_computed = bm.admit(seq, hits)
    assert bm.ensure_slots(seq, seq.num_tokens - seq.num_computed)
    return seq.num_computed


def _compute(bm: BlockManager, seq: Sequence) -> None:
    seq.num_computed = seq.num_tokens
    bm.register_full_blocks(seq)


def _check_pool(bm: BlockManager) -> None:
    free = set(bm.free_ids)
    for i, block in enumerate(bm.blocks):
        assert (block.ref_count == 0) == (i in free), i
        assert block.ref_count >= 0
    for key, block_id in bm.cached.items():
        assert bm.blocks[block_id].key == key


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    seqs = [_seq(list(range(i, i + n)), str(i)) for i, n in ((0, 5), (100, 8), (200, 1))]
    for s in seqs:
        assert _admit(bm, s) == 0
    assert [len(s.block_table) for s in seqs] == [2, 2, 1]
    assert bm.num_free_blocks == 5
    assert len({b for s in seqs for b in s.block_table}) == 5
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == 10
    _check_pool(bm)


def test_all_or_nothing_when_pool_is_short():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = _seq(list(range(9)))
    seq_hits = bm.match_prefix(seq)
    assert bm.can_admit(seq, seq_hits, 9)
    bm.admit(seq, seq_hits)
    assert bm.ensure_slots(seq, 9) and bm.num_free_blocks == 0
    other = _seq([1, 2])
    assert not bm.can_admit(other, [], 2)
    seq.num_computed = 9
    assert not bm.ensure_slots(seq, 4)  # a 4th block does not exist
    assert len(seq.block_table) == 3


def test_prefix_hits_chain_and_stop_at_first_miss():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _seq(list(range(12)) + [99])
    _admit(bm, first)
    _compute(bm, first)
    assert len(bm.cached) == 3  # three full blocks; the partial one is never cached
    same_prefix = _seq(list(range(8)) + [50, 51, 52, 53, 54])
    assert _admit(bm, same_prefix) == 8
    assert same_prefix.block_table[:2] == first.block_table[:2]
    assert bm.blocks[first.block_table[0]].ref_count == 2
    # a block equal in content but behind a different prefix is not a hit (keys chain through the parent)
    shifted = _seq([7, 7, 7, 7] + list(range(4, 8)))
    assert bm.match_prefix(shifted) == []
    assert block_key(None, [0, 1, 2, 3]) != block_key(block_key(None, [7, 7, 7, 7]), [0, 1, 2, 3])
    assert bm.stats.hit_tokens == 8
    for s in (first, same_prefix):
        bm.free(s)
    assert bm.num_free_blocks == 16
    _check_pool(bm)


def test_freed_blocks_stay_cached_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    _admit(bm, a)
    _compute(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    b = _seq([1, 2, 3, 4, 9])  # revives both cached blocks from the free list
    assert _admit(bm, b) == 4 and bm.num_free_blocks == 1
    bm.free(b)
    c = _seq([8, 8, 8, 8, 8, 8, 8])  # needs all 4 blocks: evicts the cached ones
    assert _admit(bm, c) == 0
    assert bm.cached == {} and bm.num_free_blocks == 0
    bm.free(c)
    _check_pool(bm)


def test_fully_cached_prompt_copies_the_shared_last_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(8)))
    _admit(bm, a)
    _compute(bm, a)
    b = _seq(list(range(8)))
    # every block is a hit; the last token is recomputed for its logits, into a block that ``a`` still holds
    assert _admit(bm, b) == 7
    assert bm.stats.cow_copies == 1
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert bm.take_copies() == [(a.block_table[1], b.block_table[1])] and bm.take_copies() == []
    assert bm.blocks[a.block_table[1]].ref_count == 1
    for s in (a, b):
        bm.free(s)
    assert bm.num_free_blocks == 8
    _check_pool(bm)


def test_paged_cache_copy_blocks():
    cfg = DecoderConfig(architecture="x", vocab_size=8, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=4, max_position_embeddings=16, num_experts=2, top_k=1, moe_ffn_size=4)
    cache = PagedKVCache(cfg, num_blocks=3, block_size=2, dtype=torch.float32)
    cache.pool.normal_()
    before = cache.pool.clone()
    cache.copy_blocks([(0, 2)])
    assert torch.equal(cache.k[:, :, 2], before[0][:, :, 0]) and torch.equal(cache.v[:, :, 2], before[1][:, :, 0])
    assert torch.equal(cache.pool[:, :, :, :2], before[:, :, :, :2])
