"""One rank's model: device and threads, weights, KV cache tensors, and the forward pass of a batch."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from fdkit.checkpoint import read_config
from fdkit.engine.compile_cache import CompileCache, model_signature, source_signature
from fdkit.engine.compiled import CompiledModel
from fdkit.engine.memory import DTYPE_BYTES, dygraph_dtype, is_compiled
from fdkit.engine.sequence import Sequence
from fdkit.kernels import fused_ops, packed_linear, paged_attention
from fdkit.models import model_module
from fdkit.models.layers import AttentionBatch, AttentionGroup, use_fused_ops
from fdkit.models.loader import load_weights
from fdkit.models.prompt_attention import MaskBuffer
from fdkit.parallel import get_parallel_state, pack_linears, set_expert_parallel

logger = logging.getLogger(__name__)


def configure_runtime(device: str, threads: int, world_size: int = 1) -> int:
    """Device, and CPU threads: paddle pins OpenMP to one thread on import; MKL wants a hint on AMD.
    threads=0 shares the cores among the ranks on this host. Returns the threads."""
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    paddle.set_device(device)
    threads = threads or max(1, len(os.sched_getaffinity(0)) // world_size)
    if device == "cpu":
        paddle.base.core.set_num_threads(threads)
    return threads


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> None:
    """Freed host memory stays in the process for the next step's tensors. glibc returns large freed
    blocks to the kernel (unmapped, or trimmed off the heap), and the next such tensor faults its pages in:
    gathering a 16k-token row's keys took 8.4 ms, 1.2 ms with freed memory kept. Called once the weights
    are loaded, so that their staging buffers were returned. A no-op without glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (AttributeError, OSError):
        return
    if not (mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)):
        logger.debug("mallopt refused: freed host memory goes back to the kernel")


@contextmanager
def no_strided_views():
    """With strided views a transpose is lazy, and its later copy is ~40x slower on CPU than paddle's
    transpose kernel (1.3 ms vs 0.035 ms for [8, 48, 2, 128]). The flag is process-wide, so it is
    switched off only while our model runs and other paddle code in the process sees no change."""
    previous = paddle.get_flags("FLAGS_use_stride_kernel")["FLAGS_use_stride_kernel"]
    paddle.set_flags({"FLAGS_use_stride_kernel": False})
    try:
        yield
    finally:
        paddle.set_flags({"FLAGS_use_stride_kernel": previous})


@dataclass
class StepInput:
    """What every rank needs of one sequence for one step: a small message."""

    new_token_ids: list[int]  # the tokens whose KV this step computes: a prompt chunk, or the newest token
    num_tokens: int  # the sequence's tokens in the cache once this step has run
    block_table: list[int]

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> StepInput:
        end = seq.num_computed_tokens + num_new_tokens
        return cls(seq.all_token_ids[seq.num_computed_tokens : end], end, list(seq.block_table))


class ModelRunner:
    def __init__(self, engine_cfg, model_path: str | Path, peers: list | None = None, world_size: int = 1):
        self.cfg = engine_cfg
        self.peers = peers or []  # connections to the other tensor-parallel ranks (rank 0 only)
        self.threads = configure_runtime(engine_cfg.device, engine_cfg.threads, world_size)
        if engine_cfg.dtype not in DTYPE_BYTES:
            raise ValueError(f"engine.dtype must be one of {list(DTYPE_BYTES)}, got {engine_cfg.dtype!r}")
        self.is_compiled = is_compiled(engine_cfg)
        raw_config = read_config(model_path)
        self.module = model_module(raw_config)
        self.model_config = self.module.CONFIG_CLASS.from_dict(raw_config)
        self.max_model_len = engine_cfg.max_model_len or self.model_config.max_position_embeddings
        self.block_size = engine_cfg.block_size
        # one buffer for all steps' prompt masks: a predictor fed a new numpy address every step kept
        # memory for each (+0.6 GB over 375 steps of a long prompt)
        self.mask_buffer = MaskBuffer()
        self.num_blocks = self._num_kv_blocks()
        paddle.set_default_dtype(dygraph_dtype(engine_cfg))
        paddle.seed(engine_cfg.seed)
        set_expert_parallel(engine_cfg.expert_parallel)
        with paddle.no_grad():
            self.model = self.module.MODEL_CLASS(self.model_config)
            self.model.eval()
            load_weights(self.model, self.module, Path(model_path), engine_cfg.show_progress)
            self.compiled = self._compile(Path(model_path)) if self.is_compiled else None
        self.kv_caches = self._allocate_kv_cache()
        is_cpu = engine_cfg.device == "cpu"
        if is_cpu:
            keep_freed_memory()
        self.paged_attention = None  # paddle's ops
        self.fused_ops = None
        if is_cpu and engine_cfg.attention_kernel:
            bf16 = self.is_compiled and engine_cfg.dtype == "bfloat16"
            self.paged_attention = paged_attention(engine_cfg.compile_cache_dir, self.threads, bf16)
            self.fused_ops = fused_ops(engine_cfg.compile_cache_dir, self.threads)
            if not (self.compiled and self.compiled.predictors):  # no program traces the model
                use_fused_ops(self.model, self.fused_ops)

    def _pack_linears(self) -> bool:
        """The linear layers' weights packed for oneDNN (fdkit/kernels/linear.cc); False where the kernel
        cannot be built: the dense parts then run as programs, holding the only copy of the weights (the
        memory plan counted one)."""
        kernel = packed_linear(self.cfg.compile_cache_dir, self.threads)
        if kernel is None:
            return False
        pack_linears(self.model, kernel, bf16=self.cfg.dtype == "bfloat16")
        return True

    def _compile(self, model_path: Path) -> CompiledModel:
        is_packed = self.cfg.linear_kernel and self._pack_linears()
        state = get_parallel_state()
        key_fields = {
            "model": model_signature(model_path),
            "dtype": self.cfg.dtype,
            "shard": [state.rank, state.world_size, state.expert_parallel],
            "paddle": paddle.__version__,
            "source": source_signature(),
        }
        cache = CompileCache(self.cfg.compile_cache_dir, key_fields)
        try:
            keeps_dygraph = not self.cfg.linear_kernel
            dtype = self.cfg.dtype
            return CompiledModel(self.model, cache, self.threads, dtype, not is_packed, keeps_dygraph)
        finally:
            cache.close()

    def _num_kv_blocks(self) -> int:
        if self.cfg.num_kv_blocks is None:
            raise ValueError(
                "engine.num_kv_blocks is unset: the memory plan (fdkit.engine.memory.plan_memory) sizes "
                "the KV cache before an engine is built, as LLM does"
            )
        return self.cfg.num_kv_blocks

    def _allocate_kv_cache(self) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
        num_kv_heads, head_dim = self.model.kv_cache_shape
        shape = [num_kv_heads * self.num_blocks * self.block_size, head_dim]  # head-major (PagedAttention)
        return [(paddle.zeros(shape), paddle.zeros(shape)) for _ in self.model.layers]

    @paddle.no_grad()
    def forward(self, seqs: list[Sequence], num_new_tokens: list[int]) -> paddle.Tensor:
        """Logits [len(seqs), vocab] at the last new token of each sequence."""
        steps = [StepInput.of(seq, n) for seq, n in zip(seqs, num_new_tokens, strict=True)]
        for peer in self.peers:  # the other tensor-parallel ranks run the same step
            peer.send(("forward", steps))
        return self.run(steps)

    @paddle.no_grad()
    def run(self, steps: list[StepInput]) -> paddle.Tensor:
        input_ids, positions, batch = self._prepare(steps)
        with no_strided_views():
            return (self.compiled or self.model)(input_ids, positions, self.kv_caches, batch)

    def _prepare(self, steps: list[StepInput]):
        """Token ids, positions and cache addressing of the step's new tokens, laid out group by group
        (`_partition`)."""
        input_ids, positions, slots, groups = [], [], [], []
        last_token_index = np.zeros(len(steps), dtype=np.int64)
        for members in _partition(steps):
            group, key_slots = self._group([steps[i] for i in members])
            for row, i in enumerate(members):
                step = steps[i]
                start = step.num_tokens - len(step.new_token_ids)
                input_ids += step.new_token_ids
                positions += range(start, step.num_tokens)
                slots += key_slots[row, start : step.num_tokens].tolist()
                last_token_index[i] = len(input_ids) - 1
            groups.append(group)
        batch = AttentionBatch(
            _tensor(slots), groups, paddle.to_tensor(last_token_index), self.block_size,
            paged_attention=self.paged_attention,
        )  # fmt: skip
        return _tensor(input_ids), _tensor(positions), batch

    def _group(self, steps: list[StepInput]) -> tuple[AttentionGroup, np.ndarray]:
        """The group of `steps`, rows padded to the longest run of new tokens (padding repeats a row's
        last query), and the cache slot of each row's tokens."""
        new_lens = [len(step.new_token_ids) for step in steps]
        query_len, num_keys = max(new_lens), max(step.num_tokens for step in steps)
        key_slots = np.zeros((len(steps), num_keys), dtype=np.int64)
        query_positions = np.zeros((len(steps), query_len), dtype=np.int64)
        query_index, token_index, first = [], [], 0
        for i, (step, num_new) in enumerate(zip(steps, new_lens, strict=True)):
            key_slots[i, : step.num_tokens] = self._slots(step.block_table, step.num_tokens)
            padded = np.minimum(np.arange(query_len), num_new - 1)
            query_positions[i] = step.num_tokens - num_new + padded
            query_index += (first + padded).tolist()
            token_index += range(i * query_len, i * query_len + num_new)
            first += num_new
        identity = all(n == query_len for n in new_lens)
        group = AttentionGroup(
            num_seqs=len(steps),
            query_len=query_len,
            num_tokens=first,
            query_index=None if identity else _tensor(query_index),
            token_index=None if identity else _tensor(token_index),
            query_positions=query_positions,
            key_slots=paddle.to_tensor(key_slots),
            num_keys=num_keys,
            query_lens=np.asarray(new_lens),
            mask_buffer=self.mask_buffer,
        )
        return group, key_slots

    def _slots(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        blocks = np.asarray(block_table, dtype=np.int64)[:, None] * self.block_size
        return (blocks + np.arange(self.block_size)).reshape(-1)[:num_tokens]


def _partition(steps: list[StepInput]) -> list[list[int]]:
    """Indices of the steps in each attention group: sequences with one new token (decodes, or a
    prompt's one-token chunk) by the power of 2 of their length, since a group's keys are padded to its
    longest row (one 16k-token row among short ones made every row gather 16k keys); then those with
    more (prompt chunks), which attend row by row."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, step in enumerate(steps):
        is_chunk = len(step.new_token_ids) > 1
        key = (1, 0) if is_chunk else (0, (step.num_tokens - 1).bit_length())
        groups.setdefault(key, []).append(i)
    return [groups[key] for key in sorted(groups)]


def _tensor(values) -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(values, dtype=np.int64))
