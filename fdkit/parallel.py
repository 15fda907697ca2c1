"""Tensor parallelism: the process group, and linear / embedding layers that hold one rank's shard.

Paddle's `Linear.weight` is [in, out]: a column split is axis 1, a row split axis 0. Loaders take full
tensors in that orientation and keep only this rank's slice.

Attention heads (`head_shard`) split over any number of ranks, evenly or not; routed experts
(`held_experts`) are split like any MLP, or, with expert parallelism, spread whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import paddle
import paddle.distributed as dist
from paddle import nn


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    group: object | None = None
    expert_parallel: bool = False  # routed experts spread whole over the ranks instead of each one split
    is_deferred: bool = False  # collectives left to the caller (see deferred_collectives)


_state = ParallelState()


def get_parallel_state() -> ParallelState:
    return _state


def set_parallel_state(rank: int, world_size: int, group: object | None = None) -> None:
    _state.rank, _state.world_size, _state.group = rank, world_size, group


def set_expert_parallel(enabled: bool) -> None:
    _state.expert_parallel = enabled


@contextmanager
def rank_view(world_size: int, expert_parallel: bool = False, rank: int = 0) -> Iterator[None]:
    """Layers built inside take the shapes rank `rank` of `world_size` holds (no process group: for
    sizing a model before it is loaded)."""
    saved = replace(_state)
    _state.rank, _state.world_size, _state.group = rank, world_size, None
    _state.expert_parallel = expert_parallel
    try:
        yield
    finally:
        vars(_state).update(vars(saved))


@contextmanager
def deferred_collectives() -> Iterator[None]:
    """Inside, all_reduce and all_gather_last_axis return this rank's part unchanged: for tracing a
    compiled program, which cannot hold a collective; its caller runs them between programs."""
    saved, _state.is_deferred = _state.is_deferred, True
    try:
        yield
    finally:
        _state.is_deferred = saved


def held_experts(num_experts: int) -> tuple[list[int], bool]:
    """The routed experts this rank holds, and whether each is split across the ranks.

    Tensor parallel: all of them, each split along its intermediate axis like any MLP. Expert parallel:
    num_experts / world_size whole experts, consecutive ids.
    """
    if not _state.expert_parallel or _state.world_size == 1:
        return list(range(num_experts)), True
    if num_experts % _state.world_size:
        raise ValueError(f"{num_experts} experts do not spread evenly over {_state.world_size} ranks")
    per_rank = num_experts // _state.world_size
    return list(range(_state.rank * per_rank, (_state.rank + 1) * per_rank)), False


def all_reduce(x: paddle.Tensor) -> paddle.Tensor:
    if _state.world_size > 1 and not _state.is_deferred:
        dist.all_reduce(x, group=_state.group)
    return x


def all_gather_last_axis(x: paddle.Tensor) -> paddle.Tensor:
    if _state.world_size == 1 or _state.is_deferred:
        return x
    parts: list[paddle.Tensor] = []
    dist.all_gather(parts, x, group=_state.group)
    return paddle.concat(parts, axis=-1)


def shard(
    array: np.ndarray, axis: int, num_shards: int | None = None, index: int | None = None
) -> np.ndarray:
    num_shards = _state.world_size if num_shards is None else num_shards
    if num_shards == 1:
        return array
    index = _state.rank if index is None else index
    size = array.shape[axis] // num_shards
    return np.take(array, np.arange(index * size, (index + 1) * size), axis=axis)


def assign(param: paddle.Tensor, array: np.ndarray, name: str) -> None:
    if tuple(param.shape) != tuple(array.shape):
        raise ValueError(f"{name}: checkpoint shard has shape {list(array.shape)}, expected {param.shape}")
    param.set_value(paddle.to_tensor(np.ascontiguousarray(array, dtype=np.float32)).astype(param.dtype))


def linear(x: paddle.Tensor, layer: nn.Layer) -> paddle.Tensor:
    """x W. A layer `pack_linears` packed runs oneDNN on its packed weight. A layer `to_bfloat16` converted
    holds W^T in bfloat16 instead ([out, in]: the layout oneDNN's bf16 matmul reads fastest, 1.5x faster
    for one row than [in, out]); it computes in bfloat16."""
    packed = getattr(layer, "packed", None)
    if packed is not None:
        return layer.packed_linear(x, packed, layer.out_features, layer.is_bf16)
    if layer.weight is None:
        return paddle.matmul(x.astype("bfloat16"), layer.weight_t, transpose_y=True).astype(x.dtype)
    return paddle.matmul(x, layer.weight)


def to_bfloat16(model: nn.Layer) -> None:
    """Replaces the weight of every linear layer (not the embedding) by its bfloat16 transpose."""
    for layer in model.sublayers():
        if isinstance(layer, LINEAR_LAYERS) and layer.weight is not None:
            weight_t = layer.weight.T.astype("bfloat16")
            layer.weight = None
            layer.weight_t = layer.create_parameter(
                weight_t.shape, dtype="bfloat16", default_initializer=nn.initializer.Constant(0.0)
            )
            layer.weight_t.set_value(weight_t)  # 10x faster than an Assign initializer


def pack_linears(model: nn.Layer, packed_linear, bf16: bool) -> None:
    """Replaces the weight of every linear layer (not the embedding) by its packed form for
    `packed_linear` (`fdkit.kernels.PackedLinear`), in bfloat16 if `bf16`: one copy of each weight."""
    for layer in model.sublayers():
        if isinstance(layer, LINEAR_LAYERS) and layer.weight is not None:
            layer.out_features = layer.weight.shape[1]
            layer.is_bf16 = bf16
            layer.packed_linear = packed_linear
            layer.register_buffer("packed", packed_linear.pack(layer.weight, bf16), persistable=False)
            layer.weight = None


def held_weight_bytes(model: nn.Layer) -> int:
    """Bytes of weights a model holds: its parameters, and its linear layers' packed weights."""
    params = sum(int(p.size) * p.element_size() for p in model.parameters())
    return params + sum(int(b.size) for name, b in model.named_buffers() if name.endswith("packed"))


def _zeros_param(layer: nn.Layer, shape: list[int]) -> paddle.Tensor:
    return layer.create_parameter(shape, default_initializer=nn.initializer.Constant(0.0))


def _split_size(size: int, num_shards: int) -> int:
    if size % num_shards:
        raise ValueError(f"{size} features do not split evenly over {num_shards} ranks")
    return size // num_shards


class ColumnParallelLinear(nn.Layer):
    """y = x W with W's output features split across ranks (axis 1); outputs stay sharded.
    `is_split=False`: every rank holds W whole."""

    def __init__(self, in_features: int, out_sizes: list[int], is_split: bool = True):
        super().__init__()
        self.num_shards = _state.world_size if is_split else 1
        self.out_sizes = [_split_size(size, self.num_shards) for size in out_sizes]
        self.weight = _zeros_param(self, [in_features, sum(self.out_sizes)])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return linear(x, self)

    def load(self, parts: list[np.ndarray], name: str) -> None:
        """`parts` are the full [in, out_i] tensors of the fused outputs, in order."""
        sliced = [shard(p, axis=1, num_shards=self.num_shards) for p in parts]
        assign(self.weight, np.concatenate(sliced, axis=1), name)


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank holds (see `head_shard`)."""

    heads: range  # the query heads it computes
    kv_heads: range  # the KV heads they read
    kv_head_index: tuple[int, ...]  # the local KV head each local query head reads
    holds_output: bool  # o_proj's rows of its heads (else zeros: another rank holding them adds them)


def head_shard(
    num_heads: int, num_kv_heads: int, rank: int | None = None, world_size: int | None = None
) -> HeadShard:
    """The heads of rank `rank` of `world_size` (default: this rank's). At least as many heads as ranks:
    a contiguous range each, the sizes differing by at most one (20 over 8: 3,3,3,3,2,2,2,2). Fewer:
    one each, head rank * num_heads // world_size, whose output rows only the first of its ranks holds,
    so the one all-reduce after attention adds each head once. KV heads: those its heads read (groups
    of num_heads // num_kv_heads consecutive query heads share one), possibly two on a group boundary."""
    rank = _state.rank if rank is None else rank
    world_size = _state.world_size if world_size is None else world_size
    if num_heads >= world_size:
        base, extra = divmod(num_heads, world_size)
        start = rank * base + min(rank, extra)
        heads, holds_output = range(start, start + base + (rank < extra)), True
    else:
        head = rank * num_heads // world_size
        heads = range(head, head + 1)
        holds_output = rank == 0 or (rank - 1) * num_heads // world_size != head
    group = num_heads // num_kv_heads
    kv_heads = range(heads.start // group, (heads.stop - 1) // group + 1)
    return HeadShard(heads, kv_heads, tuple(h // group - kv_heads.start for h in heads), holds_output)


def head_slice(array: np.ndarray, heads: range, head_dim: int, axis: int) -> np.ndarray:
    """The entries of `heads` along `axis`, where head h has entries h * head_dim .. (h + 1) * head_dim."""
    return np.take(array, np.arange(heads.start * head_dim, heads.stop * head_dim), axis=axis)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections fused: the columns of this rank's heads (`head_shard`)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int):
        self.heads = head_shard(num_heads, num_kv_heads)
        self.head_dim = head_dim
        q_size, kv_size = len(self.heads.heads) * head_dim, len(self.heads.kv_heads) * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], is_split=False)

    def load(self, parts: list[np.ndarray], name: str) -> None:
        q, k, v = parts
        heads, kv_heads, d = self.heads.heads, self.heads.kv_heads, self.head_dim
        k, v = (head_slice(t, kv_heads, d, axis=1) for t in (k, v))
        assign(self.weight, np.concatenate([head_slice(q, heads, d, axis=1), k, v], axis=1), name)


class RowParallelLinear(nn.Layer):
    """y = x W with W's input features split across ranks (axis 0); partial sums are all-reduced.
    `is_split=False`: every rank holds W whole. `is_reduced=False`: returns this rank's part of the sum,
    for the caller to add to others before one all-reduce."""

    def __init__(self, in_features: int, out_features: int, is_split: bool = True, is_reduced: bool = True):
        super().__init__()
        self.num_shards = _state.world_size if is_split else 1
        self.is_reduced = is_reduced
        self.weight = _zeros_param(self, [_split_size(in_features, self.num_shards), out_features])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = linear(x, self)
        return all_reduce(out) if self.is_reduced else out

    def load(self, parts: list[np.ndarray], name: str) -> None:
        assign(self.weight, shard(parts[0], axis=0, num_shards=self.num_shards), name)


class OutputParallelLinear(RowParallelLinear):
    """Attention's output projection: the input rows of this rank's query heads (`HeadShard`); zeros
    on a rank that does not hold its heads' output."""

    def __init__(self, heads: HeadShard, head_dim: int, out_features: int):
        super().__init__(len(heads.heads) * head_dim, out_features, is_split=False)
        self.heads, self.head_dim = heads, head_dim

    def load(self, parts: list[np.ndarray], name: str) -> None:
        rows = head_slice(parts[0], self.heads.heads, self.head_dim, axis=0)
        assign(self.weight, rows if self.heads.holds_output else np.zeros_like(rows), name)


class VocabParallelEmbedding(nn.Layer):
    """Embedding rows split across ranks (axis 0); a rank looks up only ids in its range."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.num_local_rows = -(-vocab_size // _state.world_size)
        self.row_start = _state.rank * self.num_local_rows
        self.vocab_size = vocab_size
        self.weight = _zeros_param(self, [self.num_local_rows, hidden_size])

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        if _state.world_size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.row_start
        is_mine = (local >= 0) & (local < self.num_local_rows)
        out = nn.functional.embedding(paddle.where(is_mine, local, paddle.zeros_like(local)), self.weight)
        return all_reduce(out * is_mine.unsqueeze(-1).astype(out.dtype))

    def load(self, parts: list[np.ndarray], name: str) -> None:
        rows = parts[0][self.row_start : self.row_start + self.num_local_rows]
        if rows.shape[0] < self.num_local_rows:  # the last rank's padding rows stay zero
            rows = np.concatenate([rows, np.zeros((self.num_local_rows - rows.shape[0], rows.shape[1]))])
        assign(self.weight, rows, name)


class ParallelLMHead(nn.Layer):
    """logits = x W with W [hidden, vocab] split by vocab columns (axis 1); shards gathered on the vocab
    axis. Kept as [in, out] even when tied to the embedding: on CPU, x @ W beats x @ E^T by up to 2x."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.num_local_cols = -(-vocab_size // _state.world_size)
        self.col_start = _state.rank * self.num_local_cols
        self.weight = _zeros_param(self, [hidden_size, self.num_local_cols])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        logits = all_gather_last_axis(linear(x, self))
        return logits[..., : self.vocab_size]

    def load(self, parts: list[np.ndarray], name: str) -> None:
        """`parts[0]` is [vocab, hidden], as the embedding is."""
        rows = parts[0][self.col_start : self.col_start + self.num_local_cols]
        if rows.shape[0] < self.num_local_cols:
            rows = np.concatenate([rows, np.zeros((self.num_local_cols - rows.shape[0], rows.shape[1]))])
        assign(self.weight, rows.T, name)


class TiedLoader:
    """Loads one checkpoint tensor into several layers (a tied embedding and LM head)."""

    def __init__(self, *layers: nn.Layer):
        self.layers = layers

    def load(self, parts: list[np.ndarray], name: str) -> None:
        for layer in self.layers:
            layer.load(parts, name)


class TransposedLoader:
    """Loads a layer from the transpose of what its `load` takes (an untied LM head stored [hidden,
    vocab], while ParallelLMHead.load takes the embedding's [vocab, hidden] to share a tied tensor)."""

    def __init__(self, layer: nn.Layer):
        self.layer = layer

    def load(self, parts: list[np.ndarray], name: str) -> None:
        self.layer.load([part.T for part in parts], name)


LINEAR_LAYERS = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)
