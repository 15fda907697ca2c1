"""ERNIE 4.5 dense (e.g. ERNIE-4.5-0.3B): the model, and how its published checkpoints name tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from fdkit.checkpoint import CheckpointError, TensorRule, parameter_name
from fdkit.models.layers import AttentionBatch, InterleavedRotaryEmbedding, PagedAttention, RMSNorm
from fdkit.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TiedLoader,
    VocabParallelEmbedding,
)

ARCHITECTURES = ("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM")
MODEL_TYPES = ("ernie4_5",)

# ERNIE 4.5's own chat template (used when tokenizer_config.json has none).
DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token if bos_token is defined and bos_token == '<|begin_of_sentence|>' "
    "else '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'Assistant: ' + message['content'] + '<|end_of_sentence|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)


@dataclass
class Ernie4_5Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, raw: dict) -> Ernie4_5Config:
        architectures = raw.get("architectures") or []
        if raw.get("model_type") not in MODEL_TYPES or not set(architectures) & set(ARCHITECTURES):
            raise CheckpointError(
                f"unsupported model: architectures={architectures}, model_type={raw.get('model_type')!r}; "
                f"fdkit serves ERNIE 4.5 dense models ({', '.join(ARCHITECTURES)}, model_type 'ernie4_5')"
            )
        if raw.get("use_bias"):
            raise CheckpointError("ERNIE 4.5 checkpoints with use_bias=true are not supported")
        num_heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        )


class Ernie4_5Attention(nn.Layer):
    def __init__(self, config: Ernie4_5Config, rotary: InterleavedRotaryEmbedding):
        super().__init__()
        c = config
        self.qkv_proj = QKVParallelLinear(
            c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        )
        self.num_heads = self.qkv_proj.out_sizes[0] // c.head_dim
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.o_proj = RowParallelLinear(c.num_attention_heads * c.head_dim, c.hidden_size)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, c.head_dim)

    def forward(self, rope, hidden, kv_cache, batch: AttentionBatch) -> paddle.Tensor:
        q, k, v = paddle.split(self.qkv_proj(hidden), self.qkv_proj.out_sizes, axis=-1)
        head_dim = self.attn.head_dim
        q = q.reshape([-1, self.num_heads, head_dim])
        k = k.reshape([-1, self.num_kv_heads, head_dim])
        q, k = self.rotary(rope, q, k)
        out = self.attn(q, k, v.reshape([-1, self.num_kv_heads, head_dim]), *kv_cache, batch)
        return self.o_proj(out)


class Ernie4_5MLP(nn.Layer):
    def __init__(self, config: Ernie4_5Config):
        super().__init__()
        self.up_gate_proj = ColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2
        )  # gate, up
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate, up = self.up_gate_proj(x).chunk(2, axis=-1)
        return self.down_proj(F.silu(gate) * up)


class Ernie4_5DecoderLayer(nn.Layer):
    def __init__(self, config: Ernie4_5Config, rotary: InterleavedRotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Ernie4_5Attention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Ernie4_5MLP(config)

    def forward(self, rope, hidden, kv_cache, batch: AttentionBatch) -> paddle.Tensor:
        hidden = hidden + self.self_attn(rope, self.input_layernorm(hidden), kv_cache, batch)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Ernie4_5ForCausalLM(nn.Layer):
    def __init__(self, config: Ernie4_5Config, max_position: int):
        super().__init__()
        self.config = config
        self.rotary = InterleavedRotaryEmbedding(config.head_dim, config.rope_theta, max_position)
        rotary = self.rotary
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList(
            [Ernie4_5DecoderLayer(config, rotary) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    @property
    def kv_cache_shape(self) -> tuple[int, int]:
        """(KV heads, head_dim) held by this rank per cached token and layer."""
        attn = self.layers[0].self_attn
        return attn.num_kv_heads, attn.attn.head_dim

    def forward(self, input_ids, positions, kv_caches, batch: AttentionBatch) -> paddle.Tensor:
        """Logits [num_seqs, vocab] at each sequence's last new token."""
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(rope, hidden, kv_cache, batch)
        hidden = paddle.gather(hidden, batch.last_token_index)
        return self.lm_head(self.norm(hidden))

    def weight_specs(self) -> dict[str, tuple[object, list[tuple[int, ...]]]]:
        """Each weight to load (see `weight_shapes`): the layer whose `load` takes its parts, their shapes."""
        sublayers = dict(self.named_sublayers())
        specs = {
            target: (sublayers[parameter_name(CHECKPOINT_RULES, target).removesuffix(".weight")], shapes)
            for target, shapes in weight_shapes(self.config).items()
        }
        if self.config.tie_word_embeddings:  # the embedding's tensor fills the LM head too
            specs["embed_tokens"] = (TiedLoader(self.embed_tokens, self.lm_head), specs["embed_tokens"][1])
        else:
            specs["lm_head"] = (_LMHeadLoader(self.lm_head), specs["lm_head"][1])
        return specs


class _LMHeadLoader:
    """Loads the LM head from [hidden, vocab], its parameter's orientation (ParallelLMHead.load takes the
    embedding's [vocab, hidden], so that a tied head can share the embedding's tensor)."""

    def __init__(self, lm_head: ParallelLMHead):
        self.lm_head = lm_head

    def load(self, parts: list[np.ndarray], name: str) -> None:
        self.lm_head.load([parts[0].T], name)


def weight_shapes(config: Ernie4_5Config) -> dict[str, list[tuple[int, ...]]]:
    """Each weight the model loads (a rule's target) and the full shapes of its parts, as our parameters
    hold them: [in, out], the LM head [hidden, vocab]. The order is the order checkpoints are written in."""
    c = config
    q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"embed_tokens": [(c.vocab_size, c.hidden_size)], "norm": [(c.hidden_size,)]}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = [(c.hidden_size, c.vocab_size)]
    for i in range(c.num_hidden_layers):
        shapes |= {
            f"{i}.qkv_proj": [(c.hidden_size, size) for size in (q_size, kv_size, kv_size)],
            f"{i}.o_proj": [(q_size, c.hidden_size)],
            f"{i}.up_gate_proj": [(c.hidden_size, c.intermediate_size)] * 2,  # gate, up
            f"{i}.down_proj": [(c.intermediate_size, c.hidden_size)],
            f"{i}.input_layernorm": [(c.hidden_size,)],
            f"{i}.post_attention_layernorm": [(c.hidden_size,)],
        }
    return shapes


# The published checkpoint layouts, and the architecture name each one's config.json gives:
#   "paddle" (ERNIE-4.5-*-Paddle): prefix "ernie.", q|k|v and gate|up each fused (contiguous) along the
#     out axis, stored like our parameters: [in, out], the LM head [hidden, vocab].
#   "pt" (ERNIE-4.5-*-PT, transformers' save_pretrained): prefix "model.", one tensor per projection,
#     stored [out, in], the LM head [vocab, hidden].
LAYOUT_ARCHITECTURES = {"paddle": "Ernie4_5_ForCausalLM", "pt": "Ernie4_5ForCausalLM"}


def _rule(
    target: str, parameter: str, paddle: str, pt: str | list[str], is_pt_transposed: bool = True
) -> TensorRule:
    """One weight: -Paddle's tensor, and -PT's tensor or tensors (then the parts, in order)."""
    pt_names = (pt,) if isinstance(pt, str) else tuple(pt)
    transposed_in = ("pt",) if is_pt_transposed else ()
    return TensorRule(target, parameter, {"paddle": (paddle,), "pt": pt_names}, transposed_in)


# target (see weight_shapes), our parameter, its -Paddle tensor, its -PT tensor(s); {i} is a layer index.
CHECKPOINT_RULES = (
    _rule(
        "embed_tokens",
        "embed_tokens.weight",
        "ernie.embed_tokens.weight",
        "model.embed_tokens.weight",
        is_pt_transposed=False,
    ),
    _rule("norm", "norm.weight", "ernie.norm.weight", "model.norm.weight", is_pt_transposed=False),
    _rule("lm_head", "lm_head.weight", "lm_head.weight", "lm_head.weight"),
    _rule(
        "{i}.qkv_proj",
        "layers.{i}.self_attn.qkv_proj.weight",
        "ernie.layers.{i}.self_attn.qkv_proj.weight",
        [
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ],
    ),
    _rule(
        "{i}.o_proj",
        "layers.{i}.self_attn.o_proj.weight",
        "ernie.layers.{i}.self_attn.o_proj.weight",
        "model.layers.{i}.self_attn.o_proj.weight",
    ),
    _rule(
        "{i}.up_gate_proj",
        "layers.{i}.mlp.up_gate_proj.weight",
        "ernie.layers.{i}.mlp.up_gate_proj.weight",
        ["model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"],
    ),
    _rule(
        "{i}.down_proj",
        "layers.{i}.mlp.down_proj.weight",
        "ernie.layers.{i}.mlp.down_proj.weight",
        "model.layers.{i}.mlp.down_proj.weight",
    ),
    _rule(
        "{i}.input_layernorm",
        "layers.{i}.input_layernorm.weight",
        "ernie.layers.{i}.input_layernorm.weight",
        "model.layers.{i}.input_layernorm.weight",
        is_pt_transposed=False,
    ),
    _rule(
        "{i}.post_attention_layernorm",
        "layers.{i}.post_attention_layernorm.weight",
        "ernie.layers.{i}.post_attention_layernorm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        is_pt_transposed=False,
    ),
)

CONFIG_CLASS = Ernie4_5Config
MODEL_CLASS = Ernie4_5ForCausalLM
