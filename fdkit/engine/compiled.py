"""The compiled step (`engine.compile`): the model's dense parts (norms, projections, MLP, RoPE, LM head)
run as Paddle Inference programs through oneDNN, and attention, which reads and writes the paged KV
cache, runs in dygraph between them. The cache never enters a program: a program fed a cache pays for
the whole cache on every run (../shared/peers/paged_kv_in_predictor.py).

One rank (tp=1) with dense layers: one program between two attentions (layer i's output projection,
residuals and MLP, then layer i+1's norm, QKV projection and RoPE), L + 1 programs a step. Otherwise
(tp > 1, or an MLP that cannot compile, as a MoE block) each layer's parts are separate programs with
the all-reduces between them. Programs take any number of tokens (oneDNN keeps a primitive per shape).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import paddle
import paddle.nn.functional as F
from paddle import inference, nn
from paddle.static import InputSpec

from fdkit.engine.compile_cache import CompileCache, save_program
from fdkit.parallel import (
    all_gather_last_axis,
    all_reduce,
    deferred_collectives,
    get_parallel_state,
    to_bfloat16,
)

logger = logging.getLogger(__name__)


class Program(nn.Layer):
    """`fn(*inputs)` over the model's sublayers `parts`, as one traced program."""

    def __init__(self, fn: Callable, parts: list[nn.Layer]):
        super().__init__()
        self.parts = nn.LayerList(parts)
        self.fn = fn

    def forward(self, x0, x1=None, x2=None, x3=None):  # tracing needs named inputs, at most 4
        if x3 is not None:
            return self.fn(x0, x1, x2, x3)
        if x2 is not None:
            return self.fn(x0, x1, x2)
        return self.fn(x0) if x1 is None else self.fn(x0, x1)


# float32 steps of fewer tokens run in dygraph: for one row MKL's matrix-vector product beats the
# programs (52 against 76 ms a step, 0.3b preset, 2-core AMD EPYC); from 2 rows the programs win.
MIN_COMPILED_TOKENS = {"float32": 2, "bfloat16": 1}
# rows per program run (18 layers' programs: 256 rows 1.35 ms a row, 2048 rows 1.49 ms a row, float32)
MAX_PROGRAM_ROWS = 256


class CompiledModel:
    """`has_programs=False`: the linear layers run fdkit's packed oneDNN kernel (`fdkit.parallel.
    pack_linears`), the rest of the model in dygraph; prompt attention runs as a program only without
    fdkit's attention kernel (`engine.attention_kernel=false`, or no compiler).
    `keeps_dygraph_weights=False`: one-row float32 steps run the programs too, which hold the only copy."""

    def __init__(
        self,
        model: nn.Layer,
        cache: CompileCache,
        threads: int,
        dtype: str,
        has_programs: bool = True,
        keeps_dygraph_weights: bool = True,
    ):
        self.model, self.cache, self.threads, self.dtype = model, cache, threads, dtype
        self.layers = list(model.layers)
        is_dense = all(layer.is_feed_forward_compilable for layer in self.layers)
        is_held_once = not (is_dense and keeps_dygraph_weights)  # a MoE model is held once
        self.min_tokens = 1 if is_held_once else MIN_COMPILED_TOKENS[dtype]
        self.vocab_size = model.config.vocab_size
        self.is_fused = get_parallel_state().world_size == 1 and is_dense
        start = time.perf_counter()
        self.predictors = {}
        if has_programs:
            self.predictors = self._build(self._fused_programs() if self.is_fused else self._split_programs())
        self.attention = None  # built on first use: fdkit's attention kernel leaves it unused
        logger.info(
            "compiled step: %d programs (%s) in %.1f s, cache %s",
            len(self.predictors),
            ("fused" if self.is_fused else "split") if has_programs else "packed linear layers, dygraph",
            time.perf_counter() - start,
            "hit" if self.cache.was_hit else ("written" if self.predictors else "unused"),
        )

    def __call__(self, input_ids, positions, kv_caches, batch) -> paddle.Tensor:
        num_tokens = input_ids.shape[0]
        if not self.predictors:
            batch = dataclasses.replace(batch, softmax_attention=self.softmax_attention)
            return self.model(input_ids, positions, kv_caches, batch)
        if num_tokens < self.min_tokens:
            return self.model(input_ids, positions, kv_caches, batch)
        num_rows = bucket(num_tokens)  # padding rows: token 0 at position 0, never attended to
        batch = dataclasses.replace(batch, softmax_attention=self.softmax_attention)
        hidden, (cos, sin) = self.model.embed(pad_rows(input_ids, num_rows), pad_rows(positions, num_rows))
        run = self._run_fused if self.is_fused else self._run_split
        return run(hidden, cos, sin, kv_caches, batch, num_tokens)

    def _run_fused(self, hidden, cos, sin, kv_caches, batch, num_tokens) -> paddle.Tensor:
        q, k, v = self.run("begin", hidden, cos, sin)
        for i, layer in enumerate(self.layers):
            attn = self._attend(layer, q, k, v, kv_caches[i], batch, num_tokens)
            if i + 1 < len(self.layers):
                hidden, q, k, v = self.run(f"into{i + 1}", hidden, attn, cos, sin)
        last = batch.last_token_index  # the last layer's MLP runs only where logits are needed
        num_seqs, num_rows = last.shape[0], bucket(last.shape[0])
        rows = [pad_rows(paddle.gather(t, last), num_rows) for t in (hidden, attn)]
        return self.run("last", *rows)[0][:num_seqs]

    def _run_split(self, hidden, cos, sin, kv_caches, batch, num_tokens) -> paddle.Tensor:
        for i, layer in enumerate(self.layers):
            q, k, v = self.run(f"in{i}", hidden, cos, sin)
            attn = self._attend(layer, q, k, v, kv_caches[i], batch, num_tokens)
            hidden = hidden + all_reduce(self.run(f"out{i}", attn)[0])
            if f"ffn{i}" in self.predictors:
                hidden = hidden + all_reduce(self.run(f"ffn{i}", hidden)[0])
            else:  # runs (and all-reduces) in dygraph
                hidden = hidden + layer.feed_forward(hidden)
        last = batch.last_token_index
        num_seqs = last.shape[0]
        (logits,) = self.run("head", pad_rows(paddle.gather(hidden, last), bucket(num_seqs)))
        return all_gather_last_axis(logits[:num_seqs])[:, : self.vocab_size]

    @staticmethod
    def _attend(layer, q, k, v, kv_cache, batch, num_tokens) -> paddle.Tensor:
        """Attention over the step's real tokens; the output padded back to the programs' rows."""
        num_rows = q.shape[0]
        if num_rows > num_tokens:
            q, k, v = q[:num_tokens], k[:num_tokens], v[:num_tokens]
        return pad_rows(layer.attention(q, k, v, kv_cache, batch), num_rows)

    def run(self, name: str, *inputs: paddle.Tensor) -> list[paddle.Tensor]:
        """Rows are independent in every program: more than MAX_PROGRAM_ROWS run in slices, which bounds
        the activations each predictor keeps (2048-row runs held ~2 GB more) and costs no speed."""
        num_rows, predictor = inputs[0].shape[0], self.predictors[name]
        if num_rows <= MAX_PROGRAM_ROWS:
            outputs = predictor.run(list(inputs))
        else:
            starts = range(0, num_rows, MAX_PROGRAM_ROWS)
            parts = [predictor.run([t[s : s + MAX_PROGRAM_ROWS] for t in inputs]) for s in starts]
            outputs = [paddle.concat(list(column)) for column in zip(*parts, strict=True)]
        self._restore_threads()
        return outputs

    def softmax_attention(self, q, keys, values, mask) -> paddle.Tensor:
        """A prompt's full query block (`fdkit.models.prompt_attention`) through the attention program."""
        if self.attention is None:
            self.attention = self._attention_predictor()
        (out,) = self.attention.run([q, keys, values, mask])
        self._restore_threads()
        return out

    def _restore_threads(self) -> None:
        # a predictor's run leaves MKL on one thread: dygraph's matmuls after it (attention) ran 1.8x slower
        paddle.base.core.set_num_threads(self.threads)

    # The programs: name -> (function, sublayers it reads, example inputs).
    def _fused_programs(self) -> dict:
        hidden, attn, cos, sin = self._examples()
        first, last = self.layers[0], self.layers[-1]
        programs = {"begin": (_begin(first), first.dense_parts(), [hidden, cos, sin])}
        for i, (prev, layer) in enumerate(zip(self.layers, self.layers[1:], strict=False), start=1):
            parts = prev.dense_parts() + layer.dense_parts()
            programs[f"into{i}"] = (_into(prev, layer), parts, [hidden, attn, cos, sin])
        parts = last.dense_parts() + self.model.logits_parts()
        programs["last"] = (_last(last, self.model.logits), parts, [hidden, attn])
        return programs

    def _split_programs(self) -> dict:
        hidden, attn, cos, sin = self._examples()
        programs = {"head": (_single(self.model.logits), self.model.logits_parts(), [hidden])}
        for i, layer in enumerate(self.layers):
            parts = layer.dense_parts()
            programs[f"in{i}"] = (_begin(layer), parts, [hidden, cos, sin])
            programs[f"out{i}"] = (_single(layer.attention_output), parts, [attn])
            if layer.is_feed_forward_compilable:
                programs[f"ffn{i}"] = (_single(layer.feed_forward), parts, [hidden])
        return programs

    def _examples(self) -> list[paddle.Tensor]:
        """One token's hidden state, attention output, cos and sin: the programs' input shapes."""
        hidden, (cos, sin) = self.model.embed(paddle.zeros([1], "int64"), paddle.zeros([1], "int64"))
        q, _, _ = self.layers[0].attention_input((cos, sin), hidden)
        return [hidden, q.reshape([1, -1]), cos, sin]

    def _build(self, programs: dict) -> dict[str, inference.Predictor]:
        predictors = self.cache.load(programs, self._predictor) or self._compile(programs)
        if self.min_tokens == 1:  # the programs hold their own copies; no dygraph step needs these
            for part in _parts(programs):
                for param in part.parameters():
                    param._clear_data()
        return predictors

    def _compile(self, programs: dict) -> dict[str, inference.Predictor]:
        """Traces and saves every program, and loads them (which proves them whole) before they are kept."""
        if self.dtype == "bfloat16":
            for part in _parts(programs):
                to_bfloat16(part)
        with self.cache.staging() as folder, deferred_collectives():
            for name, (fn, parts, examples) in programs.items():
                specs = [InputSpec([None, *t.shape[1:]], t.dtype, f"x{j}") for j, t in enumerate(examples)]
                save_program(folder, name, Program(fn, parts), specs)
            return {name: self._predictor(*self.cache.files(folder, name)) for name in programs}

    def _attention_predictor(self) -> inference.Predictor:
        """The attention program has no weights: traced at every start (~0.1 s), not cached. In bf16 oneDNN
        runs its matmuls and softmax in bf16 (1.7x faster than float32)."""
        specs = [InputSpec([None, None, None], "float32", f"x{j}") for j in range(4)]
        with tempfile.TemporaryDirectory() as folder:
            save_program(Path(folder), "attention", Program(_softmax_attention, []), specs)
            files = self.cache.files(Path(folder), "attention")
            return self._predictor(*files, bfloat16=self.dtype == "bfloat16")

    def _predictor(self, model_file: Path, params_file: Path, bfloat16: bool = False) -> inference.Predictor:
        config = inference.Config(str(model_file), str(params_file))
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(self.threads)
        config.enable_mkldnn()
        if bfloat16:
            config.enable_mkldnn_bfloat16()
        config.disable_glog_info()
        return inference.create_predictor(config)


def _parts(programs: dict) -> list[nn.Layer]:
    """Each sublayer the programs read, once (fused programs share a layer's parts)."""
    return list({id(part): part for _, parts, _ in programs.values() for part in parts}.values())


def bucket(num_rows: int) -> int:
    """The rows a program runs for `num_rows`: powers of 2 to 16, then multiples of 16 to 128, then of
    128. oneDNN keeps primitives for each shape it sees; buckets, and runs of at most MAX_PROGRAM_ROWS,
    bound them (13 shapes)."""
    if num_rows <= 16:
        return 1 << (num_rows - 1).bit_length()
    step = 16 if num_rows <= 128 else 128
    return -(-num_rows // step) * step


def pad_rows(t: paddle.Tensor, num_rows: int) -> paddle.Tensor:
    """`t` with zero rows appended up to `num_rows`."""
    if t.shape[0] == num_rows:
        return t
    return paddle.concat([t, paddle.zeros([num_rows - t.shape[0], *t.shape[1:]], t.dtype)])


def _softmax_attention(q, keys, values, mask):
    """`fdkit.models.prompt_attention`'s block math; the mask broadcast, which oneDNN fuses into the matmul
    (an expanded mask, as dygraph wants, cost a copy)."""
    scores = paddle.matmul(q, keys, transpose_y=True) + mask
    return paddle.matmul(F.softmax(scores, axis=-1), values)


def _begin(layer):
    def begin(hidden, cos, sin):
        return layer.attention_input((cos, sin), hidden)

    return begin


def _finish(layer, hidden, attn):
    hidden = hidden + layer.attention_output(attn)
    return hidden + layer.feed_forward(hidden)


def _into(prev, layer):
    def into(hidden, attn, cos, sin):
        hidden = _finish(prev, hidden, attn)
        q, k, v = layer.attention_input((cos, sin), hidden)
        return hidden, q, k, v

    return into


def _last(layer, logits):
    def last(hidden, attn):
        return logits(_finish(layer, hidden, attn))

    return last


def _single(fn):
    def single(x):
        return fn(x)

    return single
