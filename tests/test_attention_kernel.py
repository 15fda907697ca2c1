"""fdkit's C++ paged attention (fdkit/kernels/paged_attention.cc) against a numpy reference and paddle's
path: decode rows of different lengths, a small prompt chunk (causal inside), a long row whose keys are
split among threads, grouped and ungrouped key heads; prompt chunks in tiles (attention_tiles.h) across
query-block and key-tile boundaries, in float32 and bf16; decodes in register blocks (attention_decode.h);
and the engine without a compiler."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

import fdkit.kernels as kernels
from fdkit.models.layers import AttentionBatch, AttentionGroup, PagedAttention
from tests.helpers import TEST_COMPILE_CACHE

HEAD_DIM, BLOCK = 16, 8
# each row's new tokens: positions [start, end); it sees keys [0, position]
DECODES = [(4, 5), (39, 40), (1300, 1301)]
CHUNK = [(20, 25), (0, 3)]  # a chunk starting mid-sequence, and a prompt's first chunk


@pytest.fixture(scope="module")
def kernel():
    op = kernels.paged_attention(TEST_COMPILE_CACHE, num_threads=2)
    assert op is not None, "the kernel did not build"
    return op


def reference(q, k_cache, v_cache, key_slots, rows, kv_head_index, head_dim=HEAD_DIM) -> np.ndarray:
    """Causal softmax attention of each new token over its row's keys, head by head (caches slot-major)."""
    out, t = [], 0
    for row, (start, end) in enumerate(rows):
        for pos in range(start, end):
            keys, values = k_cache[key_slots[row, : pos + 1]], v_cache[key_slots[row, : pos + 1]]
            heads = []
            for h, kv in enumerate(kv_head_index):
                scores = keys[:, kv] @ q[t, h] / np.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                heads.append(weights / weights.sum() @ values[:, kv])
            out.append(np.concatenate(heads))
            t += 1
    return np.stack(out)


def make_case(rows, kv_head_index, rng, head_dim=HEAD_DIM):
    num_kv_heads = max(kv_head_index) + 1
    num_keys = max(end for _, end in rows)
    row_blocks = -(-num_keys // BLOCK)
    num_slots = (len(rows) * row_blocks + 1) * BLOCK
    k_cache, v_cache = (rng.normal(size=(num_slots, num_kv_heads, head_dim)).astype("float32") for _ in "kv")
    key_slots = np.zeros((len(rows), num_keys), dtype=np.int64)
    blocks = rng.permutation(num_slots // BLOCK)  # rows own disjoint blocks, in random order
    for row in range(len(rows)):
        mine = blocks[row * row_blocks : (row + 1) * row_blocks]
        key_slots[row] = (mine[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)[:num_keys]
    query_len = max(end - start for start, end in rows)
    positions = np.stack([np.minimum(np.arange(start, start + query_len), end - 1) for start, end in rows])
    lens = np.array([end - start for start, end in rows])
    group = AttentionGroup(
        num_seqs=len(rows), query_len=query_len, num_tokens=int(lens.sum()), query_index=None,
        token_index=None, query_positions=positions, key_slots=paddle.to_tensor(key_slots),
        num_keys=num_keys, query_lens=lens,
    )  # fmt: skip
    q = rng.normal(size=(int(lens.sum()), len(kv_head_index), head_dim)).astype("float32") * 3
    head_major = (paddle.to_tensor(c.transpose(1, 0, 2).reshape(-1, head_dim)) for c in (k_cache, v_cache))
    return q, group, tuple(head_major), (k_cache, v_cache, key_slots)


@pytest.mark.parametrize("kv_head_index", [[0, 0, 1, 1], [0, 0, 1, 2, 3, 3]], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("rows", [DECODES, CHUNK], ids=["decodes", "chunk"])
def test_kernel_equals_reference_and_paddle(kernel, rows, kv_head_index):
    rng = np.random.default_rng(len(rows) + len(kv_head_index))
    q, group, caches, (k_cache, v_cache, key_slots) = make_case(rows, kv_head_index, rng)
    attn = PagedAttention(len(kv_head_index), max(kv_head_index) + 1, HEAD_DIM, kv_head_index)
    with_kernel = attn._attend(paddle.to_tensor(q), caches, group, AttentionBatch(None, [group], None, BLOCK,
                               paged_attention=kernel)).numpy()  # fmt: skip
    want = reference(q, k_cache, v_cache, key_slots, rows, kv_head_index)
    np.testing.assert_allclose(with_kernel, want, atol=2e-5, rtol=0)
    group._token_rows = None
    paddle_path = attn._attend(paddle.to_tensor(q), caches, group, AttentionBatch(None, [group], None, BLOCK))
    np.testing.assert_allclose(with_kernel, paddle_path.numpy(), atol=2e-5, rtol=0)


def test_a_long_rows_keys_split_among_threads(kernel):
    """One KV head, one row: fewer work items than threads, so its 1301 keys run in 2 parts, merged."""
    rows, kv_head_index = [(1296, 1301)], [0, 0]
    q, group, caches, (k_cache, v_cache, key_slots) = make_case(rows, kv_head_index, np.random.default_rng(3))
    attn = PagedAttention(2, 1, HEAD_DIM)
    got = attn._attend(paddle.to_tensor(q), caches, group, AttentionBatch(None, [group], None, BLOCK,
                       paged_attention=kernel))  # fmt: skip
    want = reference(q, k_cache, v_cache, key_slots, rows, kv_head_index)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=0)


def test_one_thread_gives_the_same_output(kernel):
    rng = np.random.default_rng(7)
    q, group, caches, _ = make_case(DECODES, [0, 0, 1, 1], rng)
    rows, num_keys = group.token_rows()
    args = (paddle.to_tensor(q), *caches, group.key_slots, rows, num_keys, paddle.to_tensor([0, 1]), 2, 0.25)
    one = kernels.paged_attention(TEST_COMPILE_CACHE, num_threads=1)(*args)
    np.testing.assert_allclose(one.numpy(), kernel(*args).numpy(), atol=1e-6, rtol=0)


def test_without_a_compiler_paddles_ops_run_with_a_warning(monkeypatch, tmp_path, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("cc: command not found")

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr("paddle.utils.cpp_extension.load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="fdkit.kernels"):
        assert kernels.paged_attention(str(tmp_path), num_threads=2) is None
    assert "could not be built" in caplog.text and "cc: command not found" in caplog.text


# tiled: a block holds 64 query vectors (32 queries of 2 heads), a key tile 64 keys
PROMPTS = [(0, 70), (100, 167), (60, 61), (3, 40)]


@pytest.mark.parametrize("kv_head_index", [[0, 0, 1, 1], [0] * 8], ids=["2-per-kv", "8-per-kv"])
def test_prompt_chunks_in_tiles_equal_reference(kernel, kv_head_index):
    """Rows of 70, 67, 1 and 37 new tokens next to each other: full and partial query blocks, keys past
    one tile, a row that starts mid-sequence, and a decode beside them."""
    rng = np.random.default_rng(5)
    q, group, caches, (k_cache, v_cache, key_slots) = make_case(PROMPTS, kv_head_index, rng)
    attn = PagedAttention(len(kv_head_index), max(kv_head_index) + 1, HEAD_DIM, kv_head_index)
    batch = AttentionBatch(None, [group], None, BLOCK, paged_attention=kernel)
    got = attn._attend(paddle.to_tensor(q), caches, group, batch).numpy()
    want = reference(q, k_cache, v_cache, key_slots, PROMPTS, kv_head_index)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def run_kernel(op, q, group, caches, num_kv_heads, head_dim) -> np.ndarray:
    rows, num_keys = group.token_rows()
    kv_heads = paddle.arange(num_kv_heads, dtype="int64")
    args = (group.key_slots, rows, num_keys, kv_heads, num_kv_heads, head_dim**-0.5)
    return op(paddle.to_tensor(q), *caches, *args).numpy()


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_tiles_at_the_models_head_dim(bf16):
    """16 query heads on 2 KV heads of 128 dims (ERNIE-4.5-0.3B's); in bf16 within 3% of the largest
    output (q, keys, probabilities and values are rounded to bf16; their sums stay float32)."""
    op = kernels.paged_attention(TEST_COMPILE_CACHE, num_threads=2, bf16=bf16)
    rows, kv_head_index = [(0, 130), (200, 203)], [h // 8 for h in range(16)]
    rng = np.random.default_rng(9)
    q, group, caches, (k_cache, v_cache, key_slots) = make_case(rows, kv_head_index, rng, 128)
    got = run_kernel(op, q, group, caches, 2, 128)
    want = reference(q, k_cache, v_cache, key_slots, rows, kv_head_index, 128)
    tolerance = 0.03 * np.abs(want).max() if bf16 else 2e-5
    np.testing.assert_allclose(got, want, atol=tolerance, rtol=0)


def test_a_tiled_rows_keys_split_among_threads(kernel):
    """16 query heads on one KV head, one query at 1301 keys: one tiled item, so its keys run in 2 parts."""
    rows, kv_head_index = [(1300, 1301)], [0] * 16
    q, group, caches, (k_cache, v_cache, key_slots) = make_case(rows, kv_head_index, np.random.default_rng(4))
    got = run_kernel(kernel, q, group, caches, 1, HEAD_DIM)
    want = reference(q, k_cache, v_cache, key_slots, rows, kv_head_index)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


# decodes (fewer than 16 query vectors) in register blocks (attention_decode.h) at head dims of 128
DECODE_ROWS = [(0, 1), (4, 5), (39, 41), (63, 64), (64, 65), (100, 101), (1300, 1301)]


@pytest.mark.parametrize("heads_per_kv", [1, 2, 3, 5, 8, 12])
def test_decodes_in_register_blocks(kernel, heads_per_kv):
    """Rows of 1 and 2 new tokens at 1 to 1301 keys, 2 KV heads of 128 dims: groups of 1, 2, 4 and 8
    vectors, some padded, 12 vectors in two groups, two queries of one row with different key counts,
    key counts off the 16-key register blocks and the 64-key tiles."""
    kv_head_index = [h // heads_per_kv for h in range(2 * heads_per_kv)]
    rng = np.random.default_rng(heads_per_kv)
    q, group, caches, (k_cache, v_cache, key_slots) = make_case(DECODE_ROWS, kv_head_index, rng, 128)
    got = run_kernel(kernel, q, group, caches, 2, 128)
    want = reference(q, k_cache, v_cache, key_slots, DECODE_ROWS, kv_head_index, 128)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_a_decodes_keys_split_among_threads(kernel):
    """8 query heads on one KV head of 128 dims, one query at 1301 keys: one item, its keys in 2 parts."""
    rows, kv_head_index = [(1300, 1301)], [0] * 8
    q, group, caches, (k_cache, v_cache, key_slots) = make_case(
        rows, kv_head_index, np.random.default_rng(6), 128
    )
    got = run_kernel(kernel, q, group, caches, 1, 128)
    want = reference(q, k_cache, v_cache, key_slots, rows, kv_head_index, 128)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
