"""Paged KV-cache bookkeeping: one pool of fixed-size blocks, per-sequence block tables, reference counts,
prefix caching by chained hashes of full blocks, and copy-on-write.

A full block's cache key is ``(hash(parent_key), tokens_of_the_block)``: equal keys mean equal K/V, because a
block's K/V depend on every earlier token. A dict keyed on the tuple compares the tokens exactly, so a hash
collision cannot alias two blocks. Freed blocks keep their key and sit in an LRU free list until reused, so a
prompt seen again (a shared system prompt, a preempted sequence coming back) is served from the cache.

With attention windows on every layer (sliding or chunked), a block that every window has passed is returned
while its sequence still runs (``release_passed``): its table entry becomes the null block (``null_block``, the
cache's block no sequence owns), which no kernel reads since no query sees those keys any more.

Example (block_size 2): prompt ``[5, 6, 7, 8, 9]`` -> keys ``k0 = (hash(None), (5, 6))``,
``k1 = (hash(k0), (7, 8))``; token 9 sits in a partial block that is never shared.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from serve.engine.sequence import Sequence


@dataclass
class Block:
    ref_count: int = 0
    key: tuple | None = None


@dataclass
class CacheStats:
    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # of which found (their prefill is skipped)
    cow_copies: int = 0


def block_key(parent: tuple | None, tokens: list[int]) -> tuple:
    return (hash(parent), tuple(tokens))


class BlockManager:
    """Allocates blocks of ``block_size`` token slots to sequences. Pure bookkeeping: the K/V tensors live in
    :class:`serve.models.attention.PagedKVCache`; copies that copy-on-write needs are queued in ``pending_copies``.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block() for _ in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU: evict from front
        self.cached: dict[tuple, int] = {}
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies before the next forward
        self.stats = CacheStats()
        self.null_block = num_blocks  # the cache's extra block (PagedPool.null_block): released table entries

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------------------------
    def _keys(self, seq: Sequence, num_full: int) -> list[tuple]:
        bs = self.block_size
        while len(seq.block_keys) < num_full:
            i = len(seq.block_keys)
            parent = seq.block_keys[-1] if i else None
            seq.block_keys.append(block_key(parent, seq.token_ids[i * bs:(i + 1) * bs]))
        return seq.block_keys  # may hold more than num_full keys

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of ``seq``'s full blocks (no state change)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        num_full = seq.num_tokens // self.block_size
        for key in self._keys(seq, num_full)[:num_full]:
            block_id = self.cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether a waiting ``seq`` (no blocks) fits with ``hits`` reused and ``num_new_tokens`` computed."""
        cached = self.cached_tokens(seq, hits)
        fresh = self.blocks_for(cached + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        cow = 1 if cached % self.block_size and self.blocks[hits[-1]].ref_count > 0 else 0
        return fresh + revived + cow <= self.num_free_blocks

    def cached_tokens(self, seq: Sequence, hits: list[int]) -> int:
        # At least one token is always computed, for its logits: a fully cached prompt recomputes its last token
        # (into the last hit block: copy-on-write if another sequence shares it).
        return min(len(hits) * self.block_size, seq.num_tokens - 1)

    def admit(self, seq: Sequence, hits: list[int]) -> int:
        """Give a waiting ``seq`` its cached blocks; returns the number of tokens whose K/V it now has."""
        assert not seq.block_table, f"sequence {seq.request_id} already holds blocks"
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = list(hits)
        cached = self.cached_tokens(seq, hits)
        self.stats.queried_tokens += seq.num_tokens
        self.stats.hit_tokens += cached
        return cached

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter the blocks whose every slot is now computed into the prefix cache."""
        num_full = seq.num_computed // self.block_size
        if num_full <= seq.num_registered or not self.enable_prefix_caching:  # most decode steps fill no block
            return
        keys = self._keys(seq, num_full)
        for i in range(seq.num_registered, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.key is None and keys[i] not in self.cached:
                block.key = keys[i]
                self.cached[keys[i]] = seq.block_table[i]
        seq.num_registered = max(seq.num_registered, num_full)

    # -- allocation ---------------------------------------------------------------------------------------------
    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _allocate(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:
            if self.cached.get(block.key) == block_id:
                del self.cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make ``seq``'s table cover its next ``num_new_tokens`` writes, copying shared blocks written into.
        All or nothing: ``False`` (and no change) when the pool is short."""
        start, end = seq.num_computed, seq.num_computed + num_new_tokens
        first, last = start // self.block_size, self.blocks_for(end)
        if last <= len(seq.block_table) and first == last - 1 and self.blocks[seq.block_table[first]].ref_count == 1:
            return True  # most decode steps: the token goes into a block of its own that it already holds
        shared = [i for i in range(first, min(last, len(seq.block_table)))
                  if self.blocks[seq.block_table[i]].ref_count > 1]
        needed = max(0, last - len(seq.block_table)) + len(shared)
        if needed > self.num_free_blocks:
            return False
        for i in shared:  # copy-on-write: the other holders keep the original
            src, dst = seq.block_table[i], self._allocate()
            self.blocks[src].ref_count -= 1
            seq.block_table[i] = dst
            self.pending_copies.append((src, dst))
            self.stats.cow_copies += 1
        while len(seq.block_table) < last:
            seq.block_table.append(self._allocate())
        return True

    def release_passed(self, seq: Sequence, first_key: int) -> None:
        """Return ``seq``'s blocks that hold only keys before ``first_key``, the first one any of its later queries
        sees in any layer (attention windows); they stay in the prefix cache, as freed blocks do."""
        end = min(first_key // self.block_size, len(seq.block_table))
        for i in range(seq.num_released, end):
            self._unref(seq.block_table[i])
            seq.block_table[i] = self.null_block
        seq.num_released = max(seq.num_released, end)

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_ids[block_id] = None

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; tail blocks go first into the LRU so shared prefixes are evicted last."""
        for block_id in reversed(seq.block_table[seq.num_released:]):
            self._unref(block_id)
        seq.block_table = []
        seq.num_registered = seq.num_released = 0

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
