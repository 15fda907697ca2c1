"""fdkit's fused small ops (fdkit/kernels/ops.cc) against numpy, one and many rows (threads split large
inputs), the sampler's argmax, and an engine that runs them (and the attention kernel) against one on
paddle's ops alone."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from helpers import TEST_COMPILE_CACHE, TEST_ENGINE, batch_logits, last_logits

import fdkit.kernels as kernels
from fdkit import LLM
from fdkit.models.layers import RMSNorm, SiluAndMul

ROWS = [1, 1000]  # a decode step's row; enough elements (>= 2^16) to split among threads


@pytest.fixture(scope="module")
def ops():
    fused = kernels.fused_ops(TEST_COMPILE_CACHE, num_threads=2)
    assert fused is not None, "the kernels did not build"
    return fused


@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(ops, rows):
    rng = np.random.default_rng(rows)
    x, w = rng.normal(size=(rows, 96)).astype("float32") * 3, rng.normal(size=96).astype("float32")
    got = ops.rms_norm(paddle.to_tensor(x), paddle.to_tensor(w), 1e-5).numpy()
    np.testing.assert_allclose(
        got, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(ops, rows):
    gate_up = np.random.default_rng(rows).normal(size=(rows, 2 * 80)).astype("float32") * 4
    gate, up = gate_up[:, :80], gate_up[:, 80:]
    got = ops.silu_mul(paddle.to_tensor(gate_up)).numpy()
    np.testing.assert_allclose(got, gate / (1 + np.exp(-gate)) * up, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 32])
def test_argmax(ops, rows):
    """The first index of each row's max, as numpy and paddle: ties, -inf (banned tokens), a max at either
    end, and a row of -inf only."""
    rng = np.random.default_rng(rows)
    logits = rng.normal(size=(rows, 103424)).astype("float32")
    logits[0, [5, 70000]] = 9.0  # a tie: the first wins
    if rows > 1:
        logits[-1, :] = -np.inf
        logits[1, -1], logits[2, 0] = 20.0, 20.0
        logits[3, rng.choice(103424, 5000)] = -np.inf
    got = ops.argmax(paddle.to_tensor(logits)).numpy()
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, logits.argmax(-1))
    np.testing.assert_array_equal(got, paddle.argmax(paddle.to_tensor(logits), axis=-1).numpy())


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Adjacent pairs (a, b) -> (a cos - b sin, b cos + a sin)."""
    swapped = np.empty_like(x)
    swapped[..., 0::2], swapped[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return x * cos + swapped * sin


@pytest.mark.parametrize("rows", ROWS)
def test_split_rotate(ops, rows):
    rng = np.random.default_rng(rows)
    heads, kv_heads, d = 6, 2, 16
    qkv = rng.normal(size=(rows, (heads + 2 * kv_heads) * d)).astype("float32")
    angles = rng.uniform(0, 2 * np.pi, size=(rows, 1, d // 2))
    cos, sin = (np.repeat(f(angles), 2, axis=-1).astype("float32") for f in (np.cos, np.sin))
    q, k, v = ops.split_rotate(*(paddle.to_tensor(t) for t in (qkv, cos, sin)), heads, kv_heads)
    split = np.split(qkv, [heads * d, (heads + kv_heads) * d], axis=1)
    np.testing.assert_allclose(q.numpy(), rotate(split[0].reshape(rows, heads, d), cos, sin), atol=1e-6)
    np.testing.assert_allclose(k.numpy(), rotate(split[1].reshape(rows, kv_heads, d), cos, sin), atol=1e-6)
    np.testing.assert_array_equal(v.numpy(), split[2].reshape(rows, kv_heads, d))


def test_write_cache_in_place(ops):
    rng = np.random.default_rng(0)
    kv_heads, d, num_slots = 2, 16, 40
    k_cache, v_cache = paddle.zeros([kv_heads * num_slots, d]), paddle.zeros([kv_heads * num_slots, d])
    slots = rng.permutation(num_slots)[:7]
    k, v = (rng.normal(size=(7, kv_heads, d)).astype("float32") for _ in "kv")
    ops.write_cache(k_cache, v_cache, paddle.to_tensor(k), paddle.to_tensor(v), paddle.to_tensor(slots))
    for cache, new in ((k_cache, k), (v_cache, v)):
        head_major = cache.numpy().reshape(kv_heads, num_slots, d)
        np.testing.assert_array_equal(head_major[:, slots].transpose(1, 0, 2), new)
        assert np.count_nonzero(np.abs(head_major).sum(-1)) == 7 * kv_heads  # nothing else written


@pytest.fixture(scope="module")
def engines(tiny_pt):
    with LLM(tiny_pt, **TEST_ENGINE) as fused, LLM(tiny_pt, **TEST_ENGINE, attention_kernel=False) as plain:
        yield fused, plain


def test_an_engine_runs_them_and_equals_paddles_ops(engines):
    fused, plain = engines

    def with_ops(llm: LLM) -> list:
        layers = llm.engine.runner.model.sublayers()
        return [layer.fused_ops for layer in layers if isinstance(layer, RMSNorm | SiluAndMul)]

    assert len(with_ops(fused)) > 4 and all(ops is not None for ops in with_ops(fused))
    assert all(ops is None for ops in with_ops(plain))
    ids = fused.tokenizer.encode("hello there " * 30)
    np.testing.assert_allclose(last_logits(fused, ids), last_logits(plain, ids), atol=1e-4, rtol=0)
    batch = [ids, [7], ids[:3], ids[:40]]  # prompt chunks and a one-token row in one step
    np.testing.assert_allclose(batch_logits(fused, batch), batch_logits(plain, batch), atol=1e-4, rtol=0)
