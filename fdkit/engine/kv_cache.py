"""Paged KV cache bookkeeping: which blocks are free, which sequence holds which. No tensors here."""

from __future__ import annotations

from collections import deque

from fdkit.engine.sequence import Sequence


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Hands out fixed-size KV blocks. A block's ref count lets several sequences share it."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _num_missing_blocks(self, seq: Sequence) -> int:
        return num_blocks_for(seq.num_tokens, self.block_size) - len(seq.block_table)

    def can_allocate(self, seq: Sequence) -> bool:
        return not seq.block_table and self._num_missing_blocks(seq) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, "sequence already holds blocks"
        self._grow(seq)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the KV of every token of `seq` (its newest included) fits."""
        return self._num_missing_blocks(seq) <= self.num_free_blocks

    def append(self, seq: Sequence) -> None:
        self._grow(seq)

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []

    def _grow(self, seq: Sequence) -> None:
        for _ in range(self._num_missing_blocks(seq)):
            block_id = self.free_block_ids.popleft()
            assert self.ref_counts[block_id] == 0
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)
