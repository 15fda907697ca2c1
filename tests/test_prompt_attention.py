"""A prompt chunk's attention (fdkit/models/prompt_attention.py) against a numpy reference: rows of
different lengths, a chunk that starts mid-sequence, grouped and ungrouped key heads, one block or many."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import fdkit.models.prompt_attention as prompt_attention
from fdkit.models.layers import AttentionBatch, AttentionGroup, PagedAttention

HEAD_DIM, NUM_SLOTS = 8, 64
ROWS = [(30, 37), (0, 20)]  # each row's new tokens: positions [start, end); keys [0, end)


def reference(q, k_cache, v_cache, key_slots, kv_head_index) -> np.ndarray:
    """Causal softmax attention of each row's new tokens over its keys, head by head."""
    outs, first = [], 0
    for row, (start, end) in enumerate(ROWS):
        keys, values = k_cache[key_slots[row, :end]], v_cache[key_slots[row, :end]]
        for pos in range(start, end):
            heads = []
            for h, kv in enumerate(kv_head_index):
                scores = keys[: pos + 1, kv] @ q[first + pos - start, h] / np.sqrt(HEAD_DIM)
                weights = np.exp(scores - scores.max())
                heads.append(weights / weights.sum() @ values[: pos + 1, kv])
            outs.append(np.concatenate(heads))
        first += end - start
    return np.stack(outs)


def group_of(key_slots: np.ndarray) -> AttentionGroup:
    query_len = max(end - start for start, end in ROWS)
    positions = np.stack([np.minimum(np.arange(start, start + query_len), end - 1) for start, end in ROWS])
    return AttentionGroup(
        num_seqs=len(ROWS),
        query_len=query_len,
        num_tokens=sum(end - start for start, end in ROWS),
        query_index=None,  # unused by the prompt path
        token_index=None,
        query_positions=positions,
        key_slots=paddle.to_tensor(key_slots),
        num_keys=key_slots.shape[1],
        query_lens=np.array([end - start for start, end in ROWS]),
    )


@pytest.mark.parametrize("kv_head_index", [[0, 0, 1, 1], [0, 0, 1, 2, 3, 3]], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("block_scores", [1 << 24, 1, 5000], ids=["one-block", "1-query-blocks", "slices"])
def test_prompt_attention_equals_reference(kv_head_index, block_scores, monkeypatch):
    monkeypatch.setattr(prompt_attention, "PROMPT_BLOCK_SCORES", block_scores)
    monkeypatch.setattr(prompt_attention, "KEY_PADDING", 4)  # blocks of a row read fewer keys: slices
    rng = np.random.default_rng(0)
    num_heads, num_kv_heads = len(kv_head_index), max(kv_head_index) + 1
    k_cache, v_cache = (rng.normal(size=(NUM_SLOTS, num_kv_heads, HEAD_DIM)).astype("float32") for _ in "kv")
    key_slots = np.zeros((len(ROWS), max(end for _, end in ROWS)), dtype=np.int64)
    for row, (_, end) in enumerate(ROWS):
        key_slots[row, :end] = rng.permutation(NUM_SLOTS)[:end]
    num_tokens = sum(end - start for start, end in ROWS)
    q = rng.normal(size=(num_tokens, num_heads, HEAD_DIM)).astype("float32") * 3  # peaked softmax
    attn = PagedAttention(num_heads, num_kv_heads, HEAD_DIM, kv_head_index)
    group = group_of(key_slots)
    caches = tuple(paddle.to_tensor(c.transpose(1, 0, 2).reshape(-1, HEAD_DIM)) for c in (k_cache, v_cache))
    got = attn._attend(paddle.to_tensor(q), caches, group, AttentionBatch(None, [group], None, 16))
    want = reference(q, k_cache, v_cache, key_slots, kv_head_index)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)
