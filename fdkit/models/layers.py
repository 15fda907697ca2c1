"""Model building blocks shared by decoder-only models: RMSNorm, rotary embedding, paged attention,
grouped routed experts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from fdkit.models.prompt_attention import MaskBuffer, attend_prompt, softmax_attention
from fdkit.parallel import assign, held_experts


class RMSNorm(nn.Layer):
    fused_ops = None  # fdkit.kernels.FusedOps, set by use_fused_ops

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        # sum x 1/n, not mean: oneDNN's mean in a compiled program prints a debug line to stdout
        self.eps, self.inv_size = eps, 1.0 / hidden_size
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.fused_ops is not None and x.dtype == paddle.float32:
            return self.fused_ops.rms_norm(x, self.weight, self.eps)
        h = x if x.dtype == paddle.float32 else x.astype("float32")
        h = h * paddle.rsqrt((h * h).sum(axis=-1, keepdim=True) * self.inv_size + self.eps)  # pow() is slow
        return (h if x.dtype == paddle.float32 else h.astype(x.dtype)) * self.weight

    def load(self, parts: list[np.ndarray], name: str) -> None:
        assign(self.weight, parts[0], name)


class InterleavedRotaryEmbedding(nn.Layer):
    """RoPE over adjacent pairs (x[2i], x[2i+1]) with frequency theta^(-2i/d), as GLM and ERNIE 4.5 use.

    out = x * cos + (x @ R) * sin, where R maps each pair (a, b) to (-b, a). Paddle's CPU kernels are
    slow at broadcasting and flipping, so cos/sin are expanded to the full shape and the pair swap is a
    small matmul. cos/sin are computed for a step's positions (no table: 128 MB at 131072 positions).
    """

    fused_ops = None  # fdkit.kernels.FusedOps, set by use_fused_ops

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (paddle.arange(0, head_dim, 2, dtype="float32") / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistable=False)
        swap = np.zeros((head_dim, head_dim), dtype=np.float32)
        swap[np.arange(1, head_dim, 2), np.arange(0, head_dim, 2)] = -1.0
        swap[np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)] = 1.0
        self.register_buffer("swap", paddle.to_tensor(swap), persistable=False)

    def split_rotate(
        self, rope, qkv: paddle.Tensor, num_heads: int, num_kv_heads: int
    ) -> list[paddle.Tensor]:
        """Queries [tokens, heads, d] and keys, values [tokens, kv_heads, d] of a QKV projection [tokens,
        (heads + 2 kv_heads) d], queries and keys rotated."""
        if self.fused_ops is not None and qkv.dtype == paddle.float32:
            return self.fused_ops.split_rotate(qkv, *rope, num_heads, num_kv_heads)
        d = self.swap.shape[0]
        q, k, v = paddle.split(qkv, [num_heads * d, num_kv_heads * d, num_kv_heads * d], axis=-1)
        q, k = self(rope, q.reshape([-1, num_heads, d]), k.reshape([-1, num_kv_heads, d]))
        return [q, k, v.reshape([-1, num_kv_heads, d])]

    def lookup(self, positions: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """cos and sin [tokens, 1, head_dim] of a step, computed once for all layers."""
        freqs = paddle.outer(positions.astype("float32"), self.inv_freq)  # [tokens, d/2]
        return tuple(t.repeat_interleave(2, axis=-1).unsqueeze(1) for t in (freqs.cos(), freqs.sin()))

    def forward(
        self, cos_sin: tuple[paddle.Tensor, paddle.Tensor], *xs: paddle.Tensor
    ) -> list[paddle.Tensor]:
        """xs are [tokens, heads, head_dim]."""
        cos, sin = cos_sin
        return [self._rotate(x, cos.expand(x.shape), sin.expand(x.shape)) for x in xs]

    def _rotate(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
        h = x if x.dtype == paddle.float32 else x.astype("float32")
        out = h * cos + paddle.matmul(h, self.swap) * sin
        return out if x.dtype == paddle.float32 else out.astype(x.dtype)


class SiluAndMul(nn.Layer):
    """silu(gate) * up of [..., 2n] (gate first), as vLLM's layer of that name."""

    fused_ops = None  # fdkit.kernels.FusedOps, set by use_fused_ops

    def forward(self, gate_up: paddle.Tensor) -> paddle.Tensor:
        if self.fused_ops is not None and gate_up.dtype == paddle.float32:
            return self.fused_ops.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, axis=-1)
        return F.silu(gate) * up


def use_fused_ops(model: nn.Layer, ops) -> None:
    """The model's norms, rotary embedding, activations and cache writes run `ops` (fdkit.kernels.FusedOps):
    one C++ call each instead of paddle's 3-16 ops. Not for a model traced into programs."""
    for layer in model.sublayers(include_self=True):
        if "fused_ops" in type(layer).__dict__:
            layer.fused_ops = ops


KEY_CHUNK_SCORES = 1 << 22  # attention scores held at once per group and layer (16 MB in float32)


@dataclass
class AttentionGroup:
    """Sequences attending together: `num_seqs` rows of `query_len` query slots (decode: 1 each), over
    keys read from the paged cache through `key_slots`, or over the group's own new keys (no cache)."""

    num_seqs: int
    query_len: int
    num_tokens: int  # the group's tokens in the step, laid out consecutively
    query_index: paddle.Tensor | None  # [num_seqs * query_len] token (within the group) of each slot
    token_index: paddle.Tensor | None  # [num_tokens] query slot of each token (None: identity)
    query_positions: np.ndarray  # [num_seqs, query_len] position of each query slot
    key_slots: paddle.Tensor | None  # [num_seqs, num_keys] flat cache slot of each key (padded)
    num_keys: int  # keys of the longest row
    query_lens: np.ndarray | None = None  # [num_seqs] new tokens of each row (None: query_len each)
    mask_buffer: MaskBuffer = field(default_factory=MaskBuffer)  # prompt blocks' masks, for all layers
    _masks: dict = field(default_factory=dict)
    _token_rows: tuple | None = None

    def key_chunks(self, num_heads: int, block_size: int) -> list[tuple[int, int]]:
        """[start, end) runs of keys whose scores fit KEY_CHUNK_SCORES, whole blocks each; without a
        cache (training: short rows, a gradient through every chunk) all keys at once."""
        if self.key_slots is None:
            return [(0, self.num_keys)]
        size = KEY_CHUNK_SCORES // (self.num_seqs * self.query_len * num_heads)
        size = max(block_size, size // block_size * block_size)
        return [(start, min(start + size, self.num_keys)) for start in range(0, self.num_keys, size)]

    def token_rows(self) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Each token's row, and how many keys it sees (its position + 1), computed once per step."""
        if self._token_rows is None:
            lens = self.query_lens if self.query_lens is not None else np.full(self.num_seqs, self.query_len)
            positions = np.concatenate([self.query_positions[row, :n] for row, n in enumerate(lens)])
            rows = np.repeat(np.arange(self.num_seqs), lens)
            self._token_rows = (paddle.to_tensor(rows), paddle.to_tensor(positions + 1))
        return self._token_rows

    def mask(self, start: int, end: int) -> paddle.Tensor | None:
        """Additive mask [num_seqs, 1, 1, query_len, end - start] (0 or -inf) of keys [start, end),
        computed once per step and shared by the layers; None when every query sees all those keys."""
        if end - 1 <= self.query_positions.min():
            return None
        if (start, end) not in self._masks:
            visible = np.arange(start, end)[None, None, :] <= self.query_positions[:, :, None]
            mask = np.where(visible, 0.0, -np.inf).astype(np.float32)[:, None, None]
            self._masks[start, end] = paddle.to_tensor(mask)
        return self._masks[start, end]


@dataclass
class AttentionBatch:
    """Where one step's tokens go in the paged KV cache and what each attends to. The step's tokens are
    laid out group after group."""

    slot_mapping: paddle.Tensor | None  # [num_tokens] flat cache slot written by each new token
    groups: list[AttentionGroup]
    last_token_index: paddle.Tensor  # the tokens whose logits are needed
    block_size: int = 1  # key chunks are whole blocks
    softmax_attention: Callable = softmax_attention  # a prompt's full query blocks (without paged_attention)
    paged_attention: Callable | None = None  # every row over the cache in place (fdkit.kernels)

    @classmethod
    def causal(cls, num_rows: int, length: int, last_token_index: paddle.Tensor) -> AttentionBatch:
        """Rows of `length` tokens each attending causally to its own tokens, without a cache (training)."""
        positions = np.tile(np.arange(length), (num_rows, 1))
        group = AttentionGroup(num_rows, length, num_rows * length, None, None, positions, None, length)
        return cls(None, [group], last_token_index)


class PagedAttention(nn.Layer):
    """Writes new keys/values into the cache, then attends over each sequence's cached keys chunk by chunk
    with an online softmax (running max and sum, rescaled accumulator): memory is bounded by the chunk,
    not by the context length.

    Grouped-query attention: `kv_head_index` gives the KV head each query head reads. When each KV head
    serves an equal run of consecutive query heads (default), they share its keys without copying them;
    otherwise each query head's keys and values are gathered first.
    """

    fused_ops = None  # fdkit.kernels.FusedOps, set by use_fused_ops

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, kv_head_index: Sequence[int] | None = None
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        grouped = [h * num_kv_heads // num_heads for h in range(num_heads)]
        self.register_buffer("kv_heads", paddle.arange(num_kv_heads, dtype="int64"), persistable=False)
        if kv_head_index is None or (num_heads % num_kv_heads == 0 and list(kv_head_index) == grouped):
            self.kv_head_index, self.num_groups = None, num_kv_heads  # query groups attending together
        else:
            index = paddle.to_tensor(list(kv_head_index), dtype="int64")
            self.register_buffer("kv_head_index", index, persistable=False)
            self.num_groups = num_heads

    @property
    def read_heads(self) -> paddle.Tensor:
        """The KV head of each query group."""
        return self.kv_heads if self.kv_head_index is None else self.kv_head_index

    def forward(self, q, k, v, k_cache, v_cache, batch: AttentionBatch) -> paddle.Tensor:
        """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d]; caches: [kv_heads * slots, d], head-major
        (`cache_rows`), or None (training: each row attends to its own new tokens). Out: [tokens,
        heads * d]."""
        if k_cache is not None and self.fused_ops is not None:
            self.fused_ops.write_cache(k_cache, v_cache, k, v, batch.slot_mapping)
        elif k_cache is not None:
            rows = self.cache_rows(batch.slot_mapping, k_cache, self.kv_heads)
            k_cache[rows] = k.transpose([1, 0, 2]).reshape([-1, self.head_dim])
            v_cache[rows] = v.transpose([1, 0, 2]).reshape([-1, self.head_dim])
        if len(batch.groups) == 1:  # no slicing (a copy per layer on CPU)
            kv_source = (k, v) if k_cache is None else (k_cache, v_cache)
            return self._attend(q, kv_source, batch.groups[0], batch)
        outs, start = [], 0
        for group in batch.groups:
            end = start + group.num_tokens
            kv_source = (k[start:end], v[start:end]) if k_cache is None else (k_cache, v_cache)
            outs.append(self._attend(q[start:end], kv_source, group, batch))
            start = end
        return paddle.concat(outs)

    def _attend(self, q, kv_source, group: AttentionGroup, batch: AttentionBatch) -> paddle.Tensor:
        if group.key_slots is not None and batch.paged_attention:
            rows, num_keys = group.token_rows()
            args = (group.key_slots, rows, num_keys, self.read_heads, self.num_kv_heads, self.scale)
            return batch.paged_attention(q, *kv_source, *args)
        if group.query_len > 1 and group.key_slots is not None:
            return attend_prompt(self, q, kv_source, group, batch.softmax_attention)
        return self._attend_key_chunks(q, kv_source, group, batch.block_size)

    def _attend_key_chunks(self, q, kv_source, group: AttentionGroup, block_size: int) -> paddle.Tensor:
        """Rows of queries (decode: one each) over key chunks with an online softmax."""
        b, lq, kvh = group.num_seqs, group.query_len, self.num_groups
        g = self.num_heads // kvh
        if group.query_index is not None:
            q = paddle.gather(q, group.query_index)
        q = (q * self.scale).reshape([b, lq, kvh, g, self.head_dim]).transpose([0, 2, 3, 1, 4])
        q = q.reshape([b, kvh, g * lq, self.head_dim])
        chunks, state = group.key_chunks(self.num_heads, block_size), None
        for start, end in chunks:
            keys, values = self._keys_values(kv_source, group, start, end)
            scores = paddle.matmul(q, keys, transpose_y=True).astype("float32")  # [b, kvh, g*lq, lk]
            mask = group.mask(start, end)
            if mask is not None:  # expanded, not broadcast: broadcast adds are slow on CPU
                shape = scores.shape
                scores = scores + mask.expand([b, kvh, g, lq, end - start]).reshape(shape)
            if len(chunks) == 1:  # all keys at once (most decode steps): the fused softmax
                out = paddle.matmul(F.softmax(scores, axis=-1).astype(values.dtype), values)
            else:
                state = _online_softmax_step(state, scores, values)
        out = out if state is None else state[2] / state[1]
        out = out.astype(q.dtype).reshape([b, kvh, g, lq, self.head_dim]).transpose([0, 3, 1, 2, 4])
        out = out.reshape([b * lq, self.num_heads * self.head_dim])
        return out if group.token_index is None else paddle.gather(out, group.token_index)

    def _keys_values(self, kv_source, group: AttentionGroup, start: int, end: int):
        """Keys and values [b, groups, end - start, d] of keys [start, end) of each row."""
        if group.key_slots is not None:
            slots = group.key_slots if end - start == group.num_keys else group.key_slots[:, start:end]
            return tuple(self.gather(cache, slots) for cache in kv_source)
        shape = [group.num_seqs, group.query_len, self.num_kv_heads, self.head_dim]  # the group's own keys
        keys, values = (t.reshape(shape)[:, start:end].transpose([0, 2, 1, 3]) for t in kv_source)
        if self.kv_head_index is None:
            return keys, values
        return tuple(paddle.index_select(t, self.kv_head_index, axis=1) for t in (keys, values))

    def gather(self, cache: paddle.Tensor, slots: paddle.Tensor) -> paddle.Tensor:
        """[*slots.shape[:-1], groups, n, d]: the cache's keys (or values) at `slots` [..., n], for each
        query group's KV head. The cache is head-major, so they come out in this layout, uncopied again."""
        rows = self.cache_rows(slots, cache, self.read_heads)
        return paddle.gather(cache, rows).reshape([*slots.shape[:-1], self.num_groups, slots.shape[-1], -1])

    def cache_rows(self, slots: paddle.Tensor, cache: paddle.Tensor, heads: paddle.Tensor) -> paddle.Tensor:
        """Flat rows [..., heads, n] of `slots` [..., n] in a head-major cache [kv_heads * slots, d]:
        head h's slot s is row h * slots + s, so a head's keys sit together (a gather straight into the
        attention layout; slot-major needed a transpose, 2x the gather's time at 16k keys)."""
        num_slots = cache.shape[0] // self.num_kv_heads
        return (slots.unsqueeze(-2) + (heads * num_slots).unsqueeze(-1)).flatten()


def _online_softmax_step(state, scores: paddle.Tensor, values: paddle.Tensor):
    """Folds one chunk of scores [..., q, lk] and values [..., lk, d] into (running max, running sum,
    accumulator). The first chunk holds key 0, which every query sees, so the running max is finite."""
    chunk_max = scores.max(axis=-1, keepdim=True)
    if state is None:
        probs = paddle.exp(scores - chunk_max)
        return chunk_max, probs.sum(axis=-1, keepdim=True), paddle.matmul(probs.astype(values.dtype), values)
    running_max, running_sum, acc = state
    new_max = paddle.maximum(running_max, chunk_max)
    probs = paddle.exp(scores - new_max)
    rescale = paddle.exp(running_max - new_max)
    running_sum = running_sum * rescale + probs.sum(axis=-1, keepdim=True)
    acc = acc * rescale.astype(acc.dtype) + paddle.matmul(probs.astype(values.dtype), values)
    return new_max, running_sum, acc


class RoutedExperts(nn.LayerDict):
    """The routed experts of a MoE block that this rank holds (`held_experts`), by expert id.

    Grouped: the step's token-expert pairs are sorted by expert, and each chosen expert runs once on all
    of its tokens (on CPU, one small matmul per expert beats gathering every pair's weights).
    """

    def __init__(self, num_experts: int, make_expert: Callable[[bool], nn.Layer]):
        """`make_expert(is_split)` builds one expert, split across the ranks or whole."""
        expert_ids, is_split = held_experts(num_experts)
        super().__init__({str(e): make_expert(is_split) for e in expert_ids})
        self.is_held = np.isin(np.arange(num_experts), expert_ids)

    def forward(self, x: paddle.Tensor, weights: paddle.Tensor, expert_ids: paddle.Tensor) -> paddle.Tensor:
        """x [tokens, hidden]; weights, expert_ids [tokens, k]: each token's experts and their weights.
        The weighted sum of the outputs of this rank's experts (rows of tokens it serves none of: 0)."""
        order, experts, counts = self._pairs_by_expert(expert_ids.numpy())
        out = paddle.zeros_like(x)
        if len(order) == 0:
            return out
        token_ids = paddle.to_tensor(order // expert_ids.shape[1])
        inputs = paddle.split(paddle.gather(x, token_ids), counts.tolist())
        outputs = paddle.concat([self[str(e)](h) for e, h in zip(experts, inputs, strict=True)])
        pair_weights = paddle.gather(weights.reshape([-1]), paddle.to_tensor(order)).astype(x.dtype)
        return paddle.index_add(out, token_ids, 0, outputs * pair_weights.unsqueeze(-1))

    def _pairs_by_expert(self, expert_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The token-expert pairs (flat indices into expert_ids) of experts this rank holds, sorted by
        expert; those experts, and how many tokens each has."""
        pair_experts = expert_ids.reshape(-1)
        order = np.argsort(pair_experts, kind="stable")
        order = order[self.is_held[pair_experts[order]]]
        experts, counts = np.unique(pair_experts[order], return_counts=True)
        return order, experts, counts
