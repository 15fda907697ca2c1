"""ERNIE 4.5 dense (e.g. ERNIE-4.5-0.3B): the model, and how its published checkpoints name tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from fdkit.checkpoint import CheckpointError
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

    def weight_specs(self) -> dict[str, tuple[nn.Layer, list[tuple[int, ...]]]]:
        """Each loadable target: the layer that loads it and the full shapes of its parts, [in, out]."""
        c = self.config
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        embed = TiedLoader(self.embed_tokens, self.lm_head) if c.tie_word_embeddings else self.embed_tokens
        specs = {
            "embed_tokens": (embed, [(c.vocab_size, c.hidden_size)]),
            "norm": (self.norm, [(c.hidden_size,)]),
        }
        if not c.tie_word_embeddings:
            specs["lm_head"] = (self.lm_head, [(c.vocab_size, c.hidden_size)])
        for i, layer in enumerate(self.layers):
            specs |= {
                f"{i}.qkv_proj": (
                    layer.self_attn.qkv_proj,
                    [(c.hidden_size, n) for n in (q_out, kv_out, kv_out)],
                ),
                f"{i}.o_proj": (layer.self_attn.o_proj, [(q_out, c.hidden_size)]),
                f"{i}.up_gate_proj": (layer.mlp.up_gate_proj, [(c.hidden_size, c.intermediate_size)] * 2),
                f"{i}.down_proj": (layer.mlp.down_proj, [(c.intermediate_size, c.hidden_size)]),
                f"{i}.input_layernorm": (layer.input_layernorm, [(c.hidden_size,)]),
                f"{i}.post_attention_layernorm": (layer.post_attention_layernorm, [(c.hidden_size,)]),
            }
        return specs


# Checkpoint names. `-Paddle` checkpoints: prefix "ernie.", fused qkv_proj / up_gate_proj, [in, out].
# `-PT` and paddleformers' save_pretrained: prefix "model.", separate projections, [out, in].
_LAYER = r"(?:ernie|model)\.layers\.(\d+)\."
_NAME_RULES = [
    # (pattern, target, part): part None means the tensor holds all parts, fused along its out axis.
    (rf"{_LAYER}self_attn\.qkv_proj\.weight", "qkv_proj", None),
    (rf"{_LAYER}mlp\.up_gate_proj\.weight", "up_gate_proj", None),
    (rf"{_LAYER}self_attn\.q_proj\.weight", "qkv_proj", 0),
    (rf"{_LAYER}self_attn\.k_proj\.weight", "qkv_proj", 1),
    (rf"{_LAYER}self_attn\.v_proj\.weight", "qkv_proj", 2),
    (rf"{_LAYER}self_attn\.o_proj\.weight", "o_proj", 0),
    (rf"{_LAYER}mlp\.gate_proj\.weight", "up_gate_proj", 0),
    (rf"{_LAYER}mlp\.up_proj\.weight", "up_gate_proj", 1),
    (rf"{_LAYER}mlp\.down_proj\.weight", "down_proj", 0),
    (rf"{_LAYER}input_layernorm\.weight", "input_layernorm", 0),
    (rf"{_LAYER}post_attention_layernorm\.weight", "post_attention_layernorm", 0),
    (r"(?:ernie|model)\.embed_tokens\.weight", "embed_tokens", 0),
    (r"(?:ernie|model)\.norm\.weight", "norm", 0),
    (r"lm_head\.weight", "lm_head", 0),
]
_COMPILED_RULES = [(re.compile(pattern + "$"), target, part) for pattern, target, part in _NAME_RULES]


def map_checkpoint_name(name: str) -> tuple[str, int | None] | None:
    """A checkpoint tensor name -> (target, part), or None if the model has no use for it."""
    for pattern, target, part in _COMPILED_RULES:
        match = pattern.match(name)
        if match:
            return (f"{match.group(1)}.{target}" if match.groups() else target), part
    return None


def to_model_orientation(name: str, array: np.ndarray, vocab_size: int) -> np.ndarray:
    """Projections to Paddle's [in, out]; the LM head to [vocab, hidden] like the embedding."""
    if name == "lm_head.weight":
        return array.T if array.shape[0] != vocab_size else array
    if name.startswith("model.") and name.endswith("_proj.weight"):
        return array.T  # -PT layout stores [out, in]
    return array


def map_checkpoint_tensor(
    name: str, array: np.ndarray, config: Ernie4_5Config
) -> tuple[str, int | None, np.ndarray] | None:
    mapped = map_checkpoint_name(name)
    if mapped is None:
        return None
    target, part = mapped
    return target, part, to_model_orientation(name, array, config.vocab_size)


CONFIG_CLASS = Ernie4_5Config
MODEL_CLASS = Ernie4_5ForCausalLM
