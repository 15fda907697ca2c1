"""One rank's model: device and threads, weights, KV cache tensors, and the forward pass of a batch."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from fdkit.checkpoint import read_config
from fdkit.engine.memory import DTYPE_BYTES
from fdkit.engine.sequence import Sequence
from fdkit.models import model_module
from fdkit.models.layers import AttentionBatch
from fdkit.models.loader import load_weights
from fdkit.parallel import set_expert_parallel

logger = logging.getLogger(__name__)


def configure_runtime(device: str, threads: int, world_size: int = 1) -> None:
    """Device, and CPU threads: paddle pins OpenMP to one thread on import; MKL wants a hint on AMD.
    threads=0 shares the cores among the ranks on this host."""
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    paddle.set_device(device)
    if device == "cpu":
        paddle.base.core.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // world_size))


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

    new_token_ids: list[int]  # prefill (or recompute): all tokens; decode: the last one
    num_tokens: int
    block_table: list[int]

    @classmethod
    def of(cls, seq: Sequence, is_prefill: bool) -> StepInput:
        new = seq.all_token_ids if is_prefill else seq.all_token_ids[-1:]
        return cls(list(new), seq.num_tokens, list(seq.block_table))


class ModelRunner:
    def __init__(self, engine_cfg, model_path: str | Path, peers: list | None = None, world_size: int = 1):
        self.cfg = engine_cfg
        self.peers = peers or []  # connections to the other tensor-parallel ranks (rank 0 only)
        configure_runtime(engine_cfg.device, engine_cfg.threads, world_size)
        if engine_cfg.dtype not in DTYPE_BYTES:
            raise ValueError(f"engine.dtype must be one of {list(DTYPE_BYTES)}, got {engine_cfg.dtype!r}")
        raw_config = read_config(model_path)
        self.module = model_module(raw_config)
        self.model_config = self.module.CONFIG_CLASS.from_dict(raw_config)
        self.max_model_len = engine_cfg.max_model_len or self.model_config.max_position_embeddings
        self.block_size = engine_cfg.block_size
        self.num_blocks = self._num_kv_blocks()
        paddle.set_default_dtype(engine_cfg.dtype)
        paddle.seed(engine_cfg.seed)
        set_expert_parallel(engine_cfg.expert_parallel)
        with paddle.no_grad():
            self.model = self.module.MODEL_CLASS(self.model_config, max_position=self.max_model_len)
            self.model.eval()
            load_weights(self.model, self.module, Path(model_path), engine_cfg.show_progress)
        self.kv_caches = self._allocate_kv_cache()

    def _num_kv_blocks(self) -> int:
        if self.cfg.num_kv_blocks is None:
            raise ValueError(
                "engine.num_kv_blocks is unset: the memory plan (fdkit.engine.memory.plan_memory) sizes "
                "the KV cache before an engine is built, as LLM does"
            )
        return self.cfg.num_kv_blocks

    def _allocate_kv_cache(self) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
        num_kv_heads, head_dim = self.model.kv_cache_shape
        shape = [self.num_blocks * self.block_size, num_kv_heads, head_dim]
        return [(paddle.zeros(shape), paddle.zeros(shape)) for _ in self.model.layers]

    @paddle.no_grad()
    def forward(self, seqs: list[Sequence], is_prefill: bool) -> paddle.Tensor:
        """Logits [len(seqs), vocab] for the next token of each sequence."""
        steps = [StepInput.of(seq, is_prefill) for seq in seqs]
        for peer in self.peers:  # the other tensor-parallel ranks run the same step
            peer.send(("forward", steps))
        return self.run(steps)

    @paddle.no_grad()
    def run(self, steps: list[StepInput]) -> paddle.Tensor:
        input_ids, positions, batch = self._prepare(steps)
        with no_strided_views():
            return self.model(input_ids, positions, self.kv_caches, batch)

    def _prepare(self, steps: list[StepInput]):
        """Token ids, positions and cache addressing for the new tokens of each sequence.

        Every sequence attends to all its tokens, which the cache holds once this step has written
        the new ones. Query slots are padded to the longest new run (decode: 1 each).
        """
        new_lens = [len(step.new_token_ids) for step in steps]
        max_query_len, max_key_len = max(new_lens), max(step.num_tokens for step in steps)
        input_ids, positions, slots, query_index, token_index = [], [], [], [], []
        key_slots = np.zeros((len(steps), max_key_len), dtype=np.int64)
        mask = np.full((len(steps), max_query_len, max_key_len), -np.inf, dtype=np.float32)
        for i, (step, num_new) in enumerate(zip(steps, new_lens, strict=True)):
            start = step.num_tokens - num_new
            seq_slots = self._slots(step.block_table, step.num_tokens)
            input_ids += step.new_token_ids
            positions += range(start, step.num_tokens)
            slots += seq_slots[start:].tolist()
            key_slots[i, : step.num_tokens] = seq_slots
            first = len(input_ids) - num_new
            query_index += [first + min(j, num_new - 1) for j in range(max_query_len)]
            token_index += [i * max_query_len + j for j in range(num_new)]
            visible = np.arange(max_key_len)[None, :] <= np.arange(start, start + max_query_len)[:, None]
            mask[i][visible] = 0.0
        last_token_index = np.cumsum(new_lens) - 1
        identity = all(n == max_query_len for n in new_lens)
        batch = AttentionBatch(
            slot_mapping=_tensor(slots),
            query_index=None if identity else _tensor(query_index),
            token_index=None if identity else _tensor(token_index),
            key_slots=paddle.to_tensor(key_slots),
            mask=paddle.to_tensor(mask[:, None, None]).astype(self.cfg.dtype),
            num_seqs=len(steps),
            max_query_len=max_query_len,
            last_token_index=_tensor(last_token_index),
        )
        return _tensor(input_ids), _tensor(positions), batch

    def _slots(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        blocks = np.asarray(block_table, dtype=np.int64)[:, None] * self.block_size
        return (blocks + np.arange(self.block_size)).reshape(-1)[:num_tokens]


def _tensor(values) -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(values, dtype=np.int64))
