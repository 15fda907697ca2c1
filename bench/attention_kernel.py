"""One layer's attention through fdkit's kernel (fdkit/kernels/paged_attention.cc and attention_tiles.h),
0.3b-preset heads (16 query heads on 2 KV heads of 128 dims), keys in a paged cache of 64-slot blocks in
random order: a prompt chunk over its earlier keys, small chunks at a long context, and decode rows.

    .venv/bin/python bench/attention_kernel.py [--threads 2]

GFLOP/s counts 4 x keys x heads x head_dim per query (scores and weighted values; a causal chunk's queries
see different key counts); GB/s the keys and values of the context read once.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
import numpy as np  # noqa: E402
import paddle  # noqa: E402

from fdkit import kernels  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 2, 128, 64
CASES = {  # name: rows, each (first new position, end)
    "prompt chunk: 2,048 queries after 2,048 keys": [(2048, 4096)],
    "prompt chunk: 512 queries after 5,000 keys": [(5000, 5512)],
    "32 queries at 16k keys": [(16352, 16384)],
    "8 queries at 16k keys": [(16376, 16384)],
    "2 queries at 16k keys": [(16382, 16384)],
    "decode: 4 rows at 16k keys": [(16383, 16384)] * 4,
    "decode: 32 rows at 1k keys": [(1023, 1024)] * 32,
}


def make_inputs(rows: list[tuple[int, int]], rng: np.random.Generator) -> tuple:
    num_keys = max(end for _, end in rows)
    blocks_per_row = -(-num_keys // BLOCK)
    num_slots = blocks_per_row * BLOCK * len(rows)
    shape = (KV_HEADS * num_slots, HEAD_DIM)
    caches = [paddle.to_tensor(rng.normal(size=shape).astype("float32")) for _ in "kv"]
    blocks = rng.permutation(num_slots // BLOCK).reshape(len(rows), blocks_per_row)
    key_slots = (blocks[:, :, None] * BLOCK + np.arange(BLOCK)).reshape(len(rows), -1)[:, :num_keys]
    lens = np.array([end - start for start, end in rows])
    query_rows = np.repeat(np.arange(len(rows)), lens)
    seen = np.concatenate([np.arange(start, end) + 1 for start, end in rows])
    q = rng.normal(size=(int(lens.sum()), HEADS, HEAD_DIM)).astype("float32")
    tensors = [paddle.to_tensor(t) for t in (q, key_slots, query_rows, seen)]
    kv_heads = paddle.arange(KV_HEADS, dtype="int64")
    args = (tensors[0], *caches, *tensors[1:], kv_heads, KV_HEADS, HEAD_DIM**-0.5)
    flops = float(seen.sum()) * HEADS * HEAD_DIM * 4
    return args, flops, 2 * KV_HEADS * num_keys * len(rows) * HEAD_DIM * 4


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="fdkit-attention-bench-")
    ops = {dtype: kernels.paged_attention(root, args.threads, dtype == "bf16") for dtype in ("fp32", "bf16")}
    rng = np.random.default_rng(0)
    for name, rows in CASES.items():
        inputs, flops, num_bytes = make_inputs(rows, rng)
        for dtype, op in ops.items():
            op(*inputs)
            start = time.perf_counter()
            for _ in range(args.repeats):
                op(*inputs)
            seconds = (time.perf_counter() - start) / args.repeats
            print(f"{name:45s} {dtype}: {seconds * 1e3:8.2f} ms  {flops / seconds / 1e9:5.0f} GFLOP/s  "
                  f"{num_bytes / seconds / 1e9:5.1f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
