"""A prompt chunk's attention in paddle's ops, where fdkit's attention kernel (`fdkit.kernels`, which
reads the cache in place for every row) is off or cannot be built: each sequence's new tokens in
blocks of queries, each block over the keys up to its last position in one softmax, causal inside the
block by a mask. A block reads no key after it, and its scores are bounded by PROMPT_BLOCK_SCORES
whatever the context length.

Full blocks (as many queries as fit the score budget) run `batch.softmax_attention`: a oneDNN program
in the compiled step (`fdkit.engine.compiled`), 2x faster than dygraph. A predictor keeps memory for
every input shape it has seen (~the block's scores, measured), so the program sees few shapes: key
counts are padded to buckets (KEY_PADDING, then powers of 2 and 1.5 times them, masked) and a full
block's query count follows from its key count. Shorter blocks (a small chunk next to decodes, a
chunk's last block) run `softmax_attention` in dygraph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import paddle
import paddle.nn.functional as F

PROMPT_BLOCK_SCORES = 1 << 22  # scores of one block of queries over its keys (16 MB in float32)
MAX_QUERY_BLOCK = 256  # a prompt's queries per block
KEY_PADDING = 128
MIN_KEYS_READ = 0.75  # a block reads the row's keys (no slice, a copy) when it needs this share of them


def softmax_attention(q, keys, values, mask) -> paddle.Tensor:
    """softmax(q keys^T + mask) values. q: [groups, rows, d], scaled; keys, values: [groups, keys, d];
    mask: [1, rows, keys] (0 or -inf)."""
    scores = paddle.matmul(q, keys, transpose_y=True).astype("float32")
    scores = scores + mask.expand(scores.shape)  # expanded, not broadcast: broadcast adds are slow on CPU
    return paddle.matmul(F.softmax(scores, axis=-1).astype(values.dtype), values)


def attend_prompt(attn, q: paddle.Tensor, kv_source, group, full_kernel: Callable) -> paddle.Tensor:
    """q: [group tokens, heads, d], the rows' new tokens laid out one row after another; `attn` a
    PagedAttention; `full_kernel` runs full blocks. Out: [group tokens, heads * d]."""
    query_lens = group.query_lens if group.query_lens is not None else [group.query_len] * group.num_seqs
    outs, first = [], 0
    for row, num_new in enumerate(query_lens):
        positions = group.query_positions[row, :num_new]
        rows = _RowAttention(attn, kv_source, group.key_slots[row], int(positions[-1]) + 1)
        outs.append(rows(q[first : first + num_new], positions, group.mask_buffer, full_kernel))
        first += num_new
    return outs[0] if len(outs) == 1 else paddle.concat(outs)


class _RowAttention:
    """One sequence's queries over its cached keys [0, num_keys)."""

    def __init__(self, attn, kv_source, key_slots: paddle.Tensor, num_keys: int):
        self.attn, self.num_heads = attn, attn.num_heads
        self.num_groups = attn.num_groups
        self.keys, self.values = self._gather(kv_source, key_slots, padded(num_keys))

    def __call__(self, q, positions: np.ndarray, masks: MaskBuffer, full_kernel: Callable) -> paddle.Tensor:
        full_block = query_block(self.num_heads, padded(int(positions[-1]) + 1))
        outs, start = [], 0
        while start < len(positions):
            block = min(full_block, _next_power_of_2(len(positions) - start))
            end = min(start + block, len(positions))
            kernel = full_kernel if block == full_block else softmax_attention
            out = self._attend_block(q[start:end], positions[start:end], block, masks, kernel)
            outs.append(out[: end - start])
            start = end
        return outs[0] if len(outs) == 1 else paddle.concat(outs)

    def _attend_block(self, q, positions: np.ndarray, block: int, masks: MaskBuffer, kernel: Callable):
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
        if num_keys < MIN_KEYS_READ * keys.shape[1]:  # else the row's keys, masked: no copy
            keys, values = keys[:, :num_keys], values[:, :num_keys]
        num_keys = keys.shape[1]
        with masks.causal(positions, num_keys, g) as mask:
            out = kernel(q, keys, values, mask)
        out = out.reshape([self.num_groups, g, block, d]).transpose([2, 0, 1, 3])
        return out.reshape([block, self.num_heads * d])

    def _gather(self, kv_source, key_slots: paddle.Tensor, num_keys: int):
        """Keys and values [groups, num_keys, d]; slots past the row's (padding) read slot 0, masked."""
        slots = key_slots[: min(num_keys, key_slots.shape[0])]
        if slots.shape[0] < num_keys:
            slots = paddle.concat([slots, paddle.zeros([num_keys - slots.shape[0]], slots.dtype)])
        return [self.attn.gather(cache, slots) for cache in kv_source]  # [groups, num_keys, d]


class MaskBuffer:
    """Causal masks, [1, repeats * queries, keys] each: 0 where key <= the row's position, else -inf,
    the rows repeated for the query heads that share a key head. A runner's masks share one zeroed
    buffer: a block writes its tail (the keys from its first position on) and clears it after use, so
    its pages are touched once, not once per block and layer; paddle reads it without a copy. It grows
    by doubling: a predictor fed a new address every step kept memory for each."""

    def __init__(self):
        self._buffer = np.zeros(0, dtype=np.float32)

    @contextmanager
    def causal(self, positions: np.ndarray, num_keys: int, num_repeats: int) -> Iterator[paddle.Tensor]:
        size = num_repeats * len(positions) * num_keys
        if self._buffer.size < size:
            self._buffer = np.zeros(max(size, 2 * self._buffer.size), dtype=np.float32)
        mask = self._buffer[:size].reshape(num_repeats, len(positions), num_keys)
        first = int(positions.min())
        tail = mask[:, :, first:]
        tail[...] = np.where(np.arange(first, num_keys)[None, :] <= positions[:, None], 0.0, -np.inf)
        mask = mask.reshape(1, -1, num_keys)
        try:  # on an accelerator, a copy on the device
            yield paddle.utils.dlpack.from_dlpack(mask) if is_cpu() else paddle.to_tensor(mask)
        finally:
            tail[...] = 0.0


def is_cpu() -> bool:
    return paddle.get_device() == "cpu"


def query_block(num_heads: int, num_keys: int) -> int:
    """Queries of a full block: the largest power of 2 whose scores over `num_keys` fit
    PROMPT_BLOCK_SCORES, at most MAX_QUERY_BLOCK."""
    fits = max(1, PROMPT_BLOCK_SCORES // (num_heads * num_keys))
    return 1 << (min(fits, MAX_QUERY_BLOCK).bit_length() - 1)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def padded(num_keys: int) -> int:
    """Keys read for `num_keys`: a multiple of KEY_PADDING up to 4 of them, then the next power of 2 or
    1.5 times a power of 2 (at most 1/3 more keys; 2 buckets per doubling)."""
    if num_keys <= 4 * KEY_PADDING:
        return -(-num_keys // KEY_PADDING) * KEY_PADDING
    power = _next_power_of_2(num_keys)
    return power * 3 // 4 if num_keys <= power * 3 // 4 else power
