"""One rank's model: device and threads, weights, KV cache tensors, and the forward pass of a batch."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import paddle

from fdkit.checkpoint import CheckpointError, read_config
from fdkit.engine.kv_cache import num_blocks_for
from fdkit.engine.sequence import Sequence
from fdkit.models import model_module
from fdkit.models.layers import AttentionBatch
from fdkit.models.loader import load_weights

logger = logging.getLogger(__name__)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def configure_runtime(device: str, threads: int) -> None:
    """Device, and CPU threads: paddle pins OpenMP to one thread on import; MKL wants a hint on AMD."""
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    paddle.set_device(device)
    if device == "cpu":
        paddle.base.core.set_num_threads(threads or len(os.sched_getaffinity(0)))


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


class ModelRunner:
    def __init__(self, engine_cfg, model_path: str | Path):
        self.cfg = engine_cfg
        configure_runtime(engine_cfg.device, engine_cfg.threads)
        if engine_cfg.dtype not in DTYPE_BYTES:
            raise ValueError(f"engine.dtype must be one of {list(DTYPE_BYTES)}, got {engine_cfg.dtype!r}")
        raw_config = read_config(model_path)
        self.module = model_module(raw_config)
        self.model_config = self.module.CONFIG_CLASS.from_dict(raw_config)
        self.max_model_len = engine_cfg.max_model_len or self.model_config.max_position_embeddings
        paddle.set_default_dtype(engine_cfg.dtype)
        paddle.seed(engine_cfg.seed)
        with paddle.no_grad():
            self.model = self.module.MODEL_CLASS(self.model_config, max_position=self.max_model_len)
            self.model.eval()
            load_weights(self.model, self.module, Path(model_path), engine_cfg.show_progress)
        self.block_size = engine_cfg.block_size
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = self._allocate_kv_cache()

    def _bytes_per_block(self) -> int:
        num_kv_heads, head_dim = self.model.kv_cache_shape
        per_token = 2 * self.model_config.num_hidden_layers * num_kv_heads * head_dim
        return per_token * self.block_size * DTYPE_BYTES[self.cfg.dtype]

    def _num_kv_blocks(self) -> int:
        num_blocks = self.cfg.num_kv_blocks or int(self.cfg.kv_cache_gib * 2**30 // self._bytes_per_block())
        needed = num_blocks_for(self.max_model_len, self.block_size)
        if num_blocks < needed:
            raise CheckpointError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, but max_model_len "
                f"{self.max_model_len} needs {needed}: raise engine.kv_cache_gib or lower "
                "engine.max_model_len"
            )
        return num_blocks

    def _allocate_kv_cache(self) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
        num_kv_heads, head_dim = self.model.kv_cache_shape
        shape = [self.num_blocks * self.block_size, num_kv_heads, head_dim]
        return [(paddle.zeros(shape), paddle.zeros(shape)) for _ in self.model.layers]

    @paddle.no_grad()
    def forward(self, seqs: list[Sequence], is_prefill: bool) -> paddle.Tensor:
        """Logits [len(seqs), vocab] for the next token of each sequence."""
        input_ids, positions, batch = self._prepare(seqs, is_prefill)
        with no_strided_views():
            return self.model(input_ids, positions, self.kv_caches, batch)

    def _prepare(self, seqs: list[Sequence], is_prefill: bool):
        """Token ids, positions and cache addressing for the new tokens of each sequence.

        Prefill feeds all tokens of a sequence (recompute after preemption included); decode feeds
        the last one. Every sequence attends to all its tokens, which the cache then holds.
        """
        new_lens = [seq.num_tokens if is_prefill else 1 for seq in seqs]
        max_query_len, max_key_len = max(new_lens), max(seq.num_tokens for seq in seqs)
        input_ids, positions, slots, query_index, token_index = [], [], [], [], []
        key_slots = np.zeros((len(seqs), max_key_len), dtype=np.int64)
        mask = np.full((len(seqs), max_query_len, max_key_len), -np.inf, dtype=np.float32)
        for i, (seq, num_new) in enumerate(zip(seqs, new_lens, strict=True)):
            start = seq.num_tokens - num_new
            seq_slots = self._slots(seq.block_table, seq.num_tokens)
            input_ids += seq.token_ids[start:]
            positions += range(start, seq.num_tokens)
            slots += seq_slots[start:].tolist()
            key_slots[i, : seq.num_tokens] = seq_slots
            first = len(input_ids) - num_new
            query_index += [first + min(j, num_new - 1) for j in range(max_query_len)]
            token_index += [i * max_query_len + j for j in range(num_new)]
            visible = np.arange(max_key_len)[None, :] <= np.arange(start, start + max_query_len)[:, None]
            mask[i][visible] = 0.0
        last_token_index = np.cumsum(new_lens) - 1
        identity = not is_prefill or all(n == max_query_len for n in new_lens)
        batch = AttentionBatch(
            slot_mapping=_tensor(slots),
            query_index=None if identity else _tensor(query_index),
            token_index=None if identity else _tensor(token_index),
            key_slots=paddle.to_tensor(key_slots),
            mask=paddle.to_tensor(mask[:, None, None]).astype(self.cfg.dtype),
            num_seqs=len(seqs),
            max_query_len=max_query_len,
            last_token_index=_tensor(last_token_index),
        )
        return _tensor(input_ids), _tensor(positions), batch

    def _slots(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        blocks = np.asarray(block_table, dtype=np.int64)[:, None] * self.block_size
        return (blocks + np.arange(self.block_size)).reshape(-1)[:num_tokens]


def _tensor(values) -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(values, dtype=np.int64))
