"""Paged KV cache bookkeeping: which blocks are free, which sequence holds which, and the prefix cache:
full blocks known by the hash of their content chain, kept when their sequences end and evicted least
recently used. No tensors here."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from fdkit.engine.sequence import Sequence


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def block_hash(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """A full block's identity: its tokens and, through the parent's hash, every token before them."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


class BlockManager:
    """Hands out fixed-size KV blocks. A block's ref count lets several sequences share it.

    Free blocks are kept in eviction order: blocks holding no cached content first, then cached ones
    least recently used first. A cached block stays findable by its hash until it is handed out again.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_ids_by_hash: dict[bytes, int] = {}
        self.hash_of_block: dict[int, bytes] = {}
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache, and found
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, num_blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the leading full blocks of `seq`, short of its last token (whose logits
        the step must compute)."""
        if not self.enable_prefix_caching:
            return []
        num_blocks = (seq.num_tokens - 1) // self.block_size
        self._hash_blocks(seq, num_blocks)
        block_ids = []
        for h in seq.block_hashes[:num_blocks]:
            block_id = self.block_ids_by_hash.get(h)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def can_allocate(self, seq: Sequence, cached: list[int], num_tokens: int) -> bool:
        """Whether `seq` (holding no block) can take `cached` and blocks for its first `num_tokens`."""
        num_taken_free = sum(1 for block_id in cached if self.ref_counts[block_id] == 0)
        num_new = max(0, num_blocks_for(num_tokens, self.block_size) - len(cached))
        return not seq.block_table and num_new + num_taken_free <= self.num_free_blocks

    def allocate(self, seq: Sequence, cached: list[int], num_tokens: int) -> None:
        """Gives `seq` the cached blocks (their tokens count as computed), fresh ones up to `num_tokens`."""
        assert not seq.block_table, "sequence already holds blocks"
        for block_id in cached:
            if self.ref_counts[block_id] == 0:
                del self.free_block_ids[block_id]
            self.ref_counts[block_id] += 1
        seq.block_table = list(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        if self.enable_prefix_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += seq.num_computed_tokens
        self.grow(seq, num_tokens)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the KV of the first `num_tokens` tokens of `seq` fits."""
        return self._num_missing_blocks(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self._num_missing_blocks(seq, num_tokens)):
            seq.block_table.append(self._take_free_block())

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # a sequence's tail is evicted before its head
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids[block_id] = None
                if block_id not in self.hash_of_block:
                    self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Makes findable the blocks that `seq`'s computed tokens filled since `num_computed_before`."""
        if not self.enable_prefix_caching:
            return
        first, end = num_computed_before // self.block_size, seq.num_computed_tokens // self.block_size
        self._hash_blocks(seq, end)
        for block_id, h in zip(seq.block_table[first:end], seq.block_hashes[first:end], strict=True):
            if h not in self.block_ids_by_hash and block_id not in self.hash_of_block:
                self.block_ids_by_hash[h] = block_id
                self.hash_of_block[block_id] = h

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        while len(seq.block_hashes) < num_blocks:
            start = len(seq.block_hashes) * self.block_size
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            seq.block_hashes.append(block_hash(parent, seq.all_token_ids[start : start + self.block_size]))

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        assert self.ref_counts[block_id] == 0
        h = self.hash_of_block.pop(block_id, None)
        if h is not None:
            del self.block_ids_by_hash[h]
        self.ref_counts[block_id] = 1
        return block_id
