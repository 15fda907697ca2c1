"""A prompt chunk's attention: each sequence's new tokens in blocks of queries, each block over the keys
up to its last position in one softmax, causal inside the block by a mask. A block reads no key after
it, and its scores are bounded by PROMPT_BLOCK_SCORES whatever the context length.

The math of a block is `batch.softmax_attention`: dygraph by default, a oneDNN program in the compiled
step (`fdkit.engine.compiled`). Key counts are padded to KEY_PADDING (the padding is masked) and query
blocks are powers of 2, so that a compiled program sees few shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import paddle

PROMPT_BLOCK_SCORES = 1 << 24  # scores of one block of queries over its keys (64 MB in float32)
MAX_QUERY_BLOCK = 256  # a prompt's queries per block
KEY_PADDING = 128


def attend_prompt(attn, q: paddle.Tensor, kv_source, group, softmax_attention: Callable) -> paddle.Tensor:
    """q: [group tokens, heads, d], the rows' new tokens laid out one row after another; `attn` a
    PagedAttention. Out: [group tokens, heads * d]."""
    query_lens = group.query_lens if group.query_lens is not None else [group.query_len] * group.num_seqs
    outs, first = [], 0
    for row, num_new in enumerate(query_lens):
        positions = group.query_positions[row, :num_new]
        rows = _RowAttention(attn, kv_source, group.key_slots[row], int(positions[-1]) + 1)
        outs.append(rows(q[first : first + num_new], positions, group.mask_buffer, softmax_attention))
        first += num_new
    return outs[0] if len(outs) == 1 else paddle.concat(outs)


class _RowAttention:
    """One sequence's queries over its cached keys [0, num_keys)."""

    def __init__(self, attn, kv_source, key_slots: paddle.Tensor, num_keys: int):
        self.attn, self.num_heads = attn, attn.num_heads
        self.num_groups = attn.num_groups
        self.keys, self.values = self._gather(kv_source, key_slots, padded(num_keys))

    def __call__(
        self, q, positions: np.ndarray, masks: MaskBuffer, softmax_attention: Callable
    ) -> paddle.Tensor:
        block = query_block(self.num_heads, padded(int(positions[-1]) + 1), len(positions))
        outs = []
        for start in range(0, len(positions), block):
            end = min(start + block, len(positions))
            out = self._attend_block(q[start:end], positions[start:end], block, masks, softmax_attention)
            outs.append(out[: end - start])
        return outs[0] if len(outs) == 1 else paddle.concat(outs)

    def _attend_block(self, q, positions: np.ndarray, block: int, masks: MaskBuffer, softmax_attention):
        """q: [n <= block, heads, d] at `positions`, padded to `block` rows (repeating the last position,
        outputs dropped). Out: [block, heads * d]."""
        num_keys = padded(int(positions[-1]) + 1)
        g, d = self.num_heads // self.num_groups, self.attn.head_dim
        if q.shape[0] < block:
            q = paddle.concat([q, paddle.zeros([block - q.shape[0], *q.shape[1:]], q.dtype)])
            positions = np.concatenate([positions, np.full(block - len(positions), positions[-1])])
        q = (q * self.attn.scale).reshape([block, self.num_groups, g, d]).transpose([1, 2, 0, 3])
        q = q.reshape([self.num_groups, g * block, d])
        keys, values = self.keys, self.values
        if keys.shape[1] > num_keys:
            keys, values = keys[:, :num_keys], values[:, :num_keys]
        with masks.causal(positions, num_keys, g) as mask:
            out = softmax_attention(q, keys, values, mask)
        out = out.reshape([self.num_groups, g, block, d]).transpose([2, 0, 1, 3])
        return out.reshape([block, self.num_heads * d])

    def _gather(self, kv_source, key_slots: paddle.Tensor, num_keys: int):
        """Keys and values [groups, num_keys, d]; slots past the row's (padding) read slot 0, masked."""
        slots = key_slots[: min(num_keys, key_slots.shape[0])]
        if slots.shape[0] < num_keys:
            slots = paddle.concat([slots, paddle.zeros([num_keys - slots.shape[0]], slots.dtype)])
        out = []
        for cache in kv_source:
            t = paddle.gather(cache, slots).transpose([1, 0, 2])  # [kv_heads, num_keys, d]
            if self.attn.kv_head_index is not None:
                t = paddle.index_select(t, self.attn.kv_head_index, axis=0)
            out.append(t)
        return out


class MaskBuffer:
    """A step's causal masks, [1, repeats * queries, keys] each: 0 where key <= the row's position, else
    -inf, the rows repeated for the query heads that share a key head. They share one zeroed buffer:
    a block writes its tail (the keys from its first position on) and clears it after use, so its
    pages are touched once a step, not once per block and layer; paddle reads it without a copy."""

    def __init__(self):
        self._buffer = np.zeros(0, dtype=np.float32)

    @contextmanager
    def causal(self, positions: np.ndarray, num_keys: int, num_repeats: int) -> Iterator[paddle.Tensor]:
        size = num_repeats * len(positions) * num_keys
        if self._buffer.size < size:
            self._buffer = np.zeros(size, dtype=np.float32)
        mask = self._buffer[:size].reshape(num_repeats, len(positions), num_keys)
        first = int(positions.min())
        tail = mask[:, :, first:]
        tail[...] = np.where(np.arange(first, num_keys)[None, :] <= positions[:, None], 0.0, -np.inf)
        try:
            yield paddle.utils.dlpack.from_dlpack(mask.reshape(1, -1, num_keys))
        finally:
            tail[...] = 0.0


def query_block(num_heads: int, num_keys: int, num_queries: int) -> int:
    """Queries per block: a power of 2 whose scores over `num_keys` fit PROMPT_BLOCK_SCORES, at most
    MAX_QUERY_BLOCK, and no more than the queries need."""
    fits = max(1, PROMPT_BLOCK_SCORES // (num_heads * num_keys))
    block = 1 << (min(fits, MAX_QUERY_BLOCK).bit_length() - 1)
    return min(block, 1 << (num_queries - 1).bit_length())


def padded(num_keys: int) -> int:
    return -(-num_keys // KEY_PADDING) * KEY_PADDING
