"""Memory bandwidth for the decode roofline: GB/s read by numpy sums in N threads, paddle's `sum`, and
paddle's matrix-vector product, each over 1 GiB (more than any cache). Run with the project's venv:
`.venv/bin/python bench/memory_bandwidth.py [--threads 2]`; prints one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np

GIB = 2**30


def numpy_threads(num_threads: int, repeats: int = 5) -> float:
    arrays = [np.ones(GIB // 4 // num_threads, dtype=np.float32) for _ in range(num_threads)]
    workers = [threading.Thread(target=lambda a=a: [a.sum() for _ in range(repeats)]) for a in arrays]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return repeats * GIB / (time.perf_counter() - start) / 1e9


def paddle_reads(num_threads: int, repeats: int = 5) -> dict:
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    import paddle

    paddle.set_device("cpu")
    paddle.base.core.set_num_threads(num_threads)
    x = paddle.ones([GIB // 4 // 1024, 1024])
    row = paddle.ones([1, GIB // 4 // 1024])
    readers = {"paddle_sum": lambda: x.sum(), "paddle_gemv": lambda: paddle.matmul(row, x)}
    results = {}
    for name, read in readers.items():
        read()
        start = time.perf_counter()
        for _ in range(repeats):
            read()
        results[name] = round(repeats * GIB / (time.perf_counter() - start) / 1e9, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = {"numpy_threads": round(numpy_threads(args.threads), 1), **paddle_reads(args.threads)}
    print(json.dumps({"threads": args.threads, **result, "best_gb_s": max(result.values())}))


if __name__ == "__main__":
    main()
