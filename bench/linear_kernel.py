"""The four matmuls of a 0.3b-preset layer (QKV [1024, 2560], output [2048, 1024], gate-up [1024, 6144],
down [3072, 1024]) over 18 layers' distinct weights, as a decode or prefill step reads them: paddle's
dygraph matmul (MKL), a Paddle Inference program through oneDNN (the programs' way: float32 [in, out], bf16
[out, in] with casts), and fdkit's packed oneDNN kernel (fdkit/kernels/linear.cc), in float32 and bf16.

    .venv/bin/python bench/linear_kernel.py [--rows 1,8,32,128,256] [--threads 2]

Each way runs in its own process: next to 36 programs' predictors, the kernel at 128 rows measured
40-90% slower than alone (not from a predictor's run: one predictor, run or not, left it unchanged).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
import paddle  # noqa: E402
from paddle import inference  # noqa: E402

from fdkit import kernels  # noqa: E402

SHAPES = [(1024, 2560), (2048, 1024), (1024, 6144), (3072, 1024)]
NUM_LAYERS = 18


class Layer(paddle.nn.Layer):
    def __init__(self, bf16: bool):
        super().__init__()
        self.bf16 = bf16
        dtype = "bfloat16" if bf16 else "float32"
        shapes = [[o, i] if bf16 else [i, o] for i, o in SHAPES]
        self.ws = paddle.nn.ParameterList([self.create_parameter(s, dtype=dtype) for s in shapes])

    def forward(self, x0, x1, x2, x3):
        xs = (x0, x1, x2, x3)  # (dy2static's zip takes no `strict`)
        if self.bf16:
            return [paddle.matmul(xs[i].astype("bfloat16"), self.ws[i], transpose_y=True).astype("float32")
                    for i in range(4)]  # fmt: skip
        return [paddle.matmul(xs[i], self.ws[i]) for i in range(4)]


def predictors(bf16: bool, threads: int, folder: str) -> list:
    spec = [paddle.static.InputSpec([None, i], "float32", f"x{j}") for j, (i, _) in enumerate(SHAPES)]
    out = []
    for n in range(NUM_LAYERS):
        path = f"{folder}/l{n}"
        paddle.jit.save(paddle.jit.to_static(Layer(bf16), input_spec=spec, full_graph=True), path)
        config = inference.Config(f"{path}.json", f"{path}.pdiparams")
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads)
        config.enable_mkldnn()
        config.disable_glog_info()
        out.append(inference.create_predictor(config))
    return out


def timed(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


WAYS = ["dygraph float32", "program float32", "kernel float32", "program bf16", "kernel bf16"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,8,32,128,256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--way", choices=WAYS, help="one way, in this process (default: each in its own)")
    args = parser.parse_args()
    if args.way is None:
        for way in WAYS:
            subprocess.run([sys.executable, __file__, "--rows", args.rows, "--threads", str(args.threads),
                            "--way", way], check=True)  # fmt: skip
        return
    paddle.set_device("cpu")
    paddle.base.core.set_num_threads(args.threads)
    run = way_runner(args.way, args.threads)
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = [paddle.randn([rows, i]) for i, _ in SHAPES]
        flop = 2 * rows * NUM_LAYERS * sum(i * o for i, o in SHAPES)
        seconds = timed(lambda xs=xs: run(xs))
        print(f"rows {rows:4d}  {args.way:16s} {seconds / NUM_LAYERS * 1e3:6.2f} ms a layer  "
              f"{flop / seconds / 1e9:6.0f} GFLOP/s", flush=True)  # fmt: skip


def way_runner(way: str, threads: int):
    """`run(xs)`: one pass over the 18 layers' four matmuls, that way."""
    kind, dtype = way.split()
    bf16 = dtype == "bf16"
    weights = [[paddle.randn(list(s)) for s in SHAPES] for _ in range(NUM_LAYERS)]
    if kind == "dygraph":
        return lambda xs: [paddle.matmul(x, w) for layer in weights for x, w in zip(xs, layer, strict=True)]
    if kind == "program":
        folder = tempfile.mkdtemp()
        programs = predictors(bf16, threads, folder)
        return lambda xs: [p.run(xs) for p in programs]
    kernel = kernels.packed_linear(tempfile.mkdtemp(), threads)
    packed = [[kernel.pack(w, bf16) for w in layer] for layer in weights]
    out_features = [o for _, o in SHAPES]

    def run(xs):
        return [
            kernel(x, w, o, bf16) for layer in packed for x, w, o in zip(xs, layer, out_features, strict=True)
        ]

    return run


if __name__ == "__main__":
    main()
