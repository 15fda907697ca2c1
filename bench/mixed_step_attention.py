"""One layer's attention in a mixed step, the cost that sets the decode-stall budget during a long prefill:
4 decode rows of 40 keys, and one prompt row at `--context` keys with n new tokens, through
`PagedAttention` as the engine calls it (head-major cache, blocks of 64 slots in random order, the
compiled step's attention program for full prompt blocks). `--kernel` adds fdkit's C++ kernel
(`engine.attention_kernel`). Run with the project's venv, one benchmark at a time:
`.venv/bin/python bench/mixed_step_attention.py [--kernel] [--context 16384]`; prints a line per n."""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import paddle

from fdkit.engine.compile_cache import CompileCache
from fdkit.engine.compiled import CompiledModel
from fdkit.engine.model_runner import keep_freed_memory, no_strided_views
from fdkit.kernels import paged_attention
from fdkit.models.layers import AttentionBatch, AttentionGroup, PagedAttention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 2, 128, 64  # ERNIE 4.5 0.3B's attention
NEW_TOKENS = [0, 1, 2, 8, 32, 128]  # 0: the 4 decodes alone


def group_of(row_lens: list[int], num_new: int, num_slots: int, rng) -> AttentionGroup:
    num_keys = max(row_lens)
    key_slots = np.zeros((len(row_lens), num_keys), dtype=np.int64)
    for row, length in enumerate(row_lens):
        blocks = rng.permutation(num_slots // BLOCK)[: -(-length // BLOCK)]
        key_slots[row, :length] = (blocks[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)[:length]
    positions = np.array([[length - num_new + j for j in range(num_new)] for length in row_lens])
    return AttentionGroup(
        len(row_lens), num_new, len(row_lens) * num_new, None, None, positions,
        paddle.to_tensor(key_slots), num_keys, np.full(len(row_lens), num_new),
    )  # fmt: skip


def step(num_new: int, context: int, num_slots: int, kernels: dict, rng):
    groups = [group_of([40] * 4, 1, num_slots, rng)]
    if num_new:
        groups.append(group_of([context + num_new], num_new, num_slots, rng))
    num_tokens = sum(g.num_tokens for g in groups)
    slots = paddle.to_tensor(rng.permutation(num_slots)[:num_tokens])  # where the new keys are written
    batch = AttentionBatch(slots, groups, None, BLOCK, **kernels)
    q, k, v = (paddle.randn([num_tokens, h, HEAD_DIM]) for h in (HEADS, KV_HEADS, KV_HEADS))
    return q, k, v, batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel", action="store_true", help="fdkit's C++ paged attention")
    args = parser.parse_args()
    paddle.base.core.set_num_threads(args.threads)
    keep_freed_memory()
    num_slots = 4 * args.context
    caches = [paddle.randn([KV_HEADS * num_slots, HEAD_DIM]) for _ in "kv"]
    compiled = CompiledModel.__new__(CompiledModel)  # only its attention program
    compiled.threads, compiled.dtype, compiled.cache = args.threads, "float32", CompileCache
    compiled.attention = compiled._attention_predictor()
    kernels = {"softmax_attention": compiled.softmax_attention}
    if args.kernel:
        build_dir = tempfile.mkdtemp(prefix="fdkit-bench-kernels-")
        kernels["paged_attention"] = paged_attention(build_dir, args.threads)
    attn, rng = PagedAttention(HEADS, KV_HEADS, HEAD_DIM), np.random.default_rng(0)
    for num_new in NEW_TOKENS:
        q, k, v, batch = step(num_new, args.context, num_slots, kernels, rng)
        with no_strided_views():
            for _ in range(2):
                attn(q, k, v, *caches, batch)
            start = time.perf_counter()
            for _ in range(10):
                attn(q, k, v, *caches, batch)
        ms = (time.perf_counter() - start) / 10 * 1e3
        print(
            f"context {args.context}, {num_new:3d} new tokens: {ms:7.2f} ms a layer, x18 = {ms * 18:.1f} ms"
        )


if __name__ == "__main__":
    main()
