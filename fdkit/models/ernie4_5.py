"""ERNIE 4.5 dense (e.g. ERNIE-4.5-0.3B): the model, and how its published checkpoints name tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import paddle
from paddle import nn

from fdkit.checkpoint import CheckpointError, TensorRule, parameter_name
from fdkit.models.layers import (
    AttentionBatch,
    InterleavedRotaryEmbedding,
    PagedAttention,
    RMSNorm,
    SiluAndMul,
)
from fdkit.parallel import (
    ColumnParallelLinear,
    OutputParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TiedLoader,
    TransposedLoader,
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
        check_model(raw, ARCHITECTURES, MODEL_TYPES, "ERNIE 4.5 dense models")
        return cls(**decoder_fields(raw))


def check_model(raw: dict, architectures: tuple[str, ...], model_types: tuple[str, ...], what: str) -> None:
    named = raw.get("architectures") or []
    if raw.get("model_type") not in model_types or not set(named) & set(architectures):
        raise CheckpointError(
            f"unsupported model: architectures={named}, model_type={raw.get('model_type')!r}; "
            f"fdkit serves {what} ({', '.join(architectures)}, model_type {model_types[0]!r})"
        )
    if raw.get("use_bias"):
        raise CheckpointError("ERNIE 4.5 checkpoints with use_bias=true are not supported")


def decoder_fields(raw: dict) -> dict:
    """The fields of `Ernie4_5Config` from a config.json (transformers 5 nests rope_theta in
    rope_parameters)."""
    num_heads = raw["num_attention_heads"]
    rope_theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rope_theta=float(rope_theta),
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
        heads = self.qkv_proj.heads  # the heads this layer holds
        self.num_heads, self.num_kv_heads = len(heads.heads), len(heads.kv_heads)
        self.o_proj = OutputParallelLinear(heads, c.head_dim, c.hidden_size)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, c.head_dim, heads.kv_head_index)

    def project(self, rope, hidden) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Queries [tokens, heads, d] and keys, values [tokens, kv_heads, d], rotated."""
        return self.rotary.split_rotate(rope, self.qkv_proj(hidden), self.num_heads, self.num_kv_heads)

    def forward(self, rope, hidden, kv_cache, batch: AttentionBatch) -> paddle.Tensor:
        return self.o_proj(self.attn(*self.project(rope, hidden), *kv_cache, batch))


class Ernie4_5MLP(nn.Layer):
    """SwiGLU. `is_split` / `is_reduced`: see RowParallelLinear (a routed expert's output is summed with
    the MoE block's other parts before one all-reduce)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, is_split: bool = True, is_reduced: bool = True
    ):
        super().__init__()
        self.up_gate_proj = ColumnParallelLinear(hidden_size, [intermediate_size] * 2, is_split)  # gate, up
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, is_split, is_reduced)
        self.act = SiluAndMul()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(self.act(self.up_gate_proj(x)))


class Ernie4_5DecoderLayer(nn.Layer):
    def __init__(self, config: Ernie4_5Config, rotary: InterleavedRotaryEmbedding, mlp: nn.Layer):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Ernie4_5Attention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    # A layer in four parts, so that a compiled step (fdkit/engine/compiled.py) can run the dense ones
    # as programs and attention, which reads and writes the paged KV cache, between them.
    def attention_input(self, rope, hidden):
        return self.self_attn.project(rope, self.input_layernorm(hidden))

    def attention(self, q, k, v, kv_cache, batch: AttentionBatch) -> paddle.Tensor:
        return self.self_attn.attn(q, k, v, *kv_cache, batch)

    def attention_output(self, attn: paddle.Tensor) -> paddle.Tensor:
        return self.self_attn.o_proj(attn)

    def feed_forward(self, hidden: paddle.Tensor) -> paddle.Tensor:
        return self.mlp(self.post_attention_layernorm(hidden))

    @property
    def is_feed_forward_compilable(self) -> bool:
        return getattr(self.mlp, "is_compilable", True)

    def dense_parts(self) -> list[nn.Layer]:
        """The sublayers a compiled step runs as programs: all but a feed-forward that cannot compile."""
        if self.is_feed_forward_compilable:
            return [self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp]
        return [self.input_layernorm, self.self_attn]

    def forward(self, rope, hidden, kv_cache, batch: AttentionBatch) -> paddle.Tensor:
        attn = self.attention(*self.attention_input(rope, hidden), kv_cache, batch)
        hidden = hidden + self.attention_output(attn)
        return hidden + self.feed_forward(hidden)


class Ernie4_5ForCausalLM(nn.Layer):
    def __init__(self, config: Ernie4_5Config, max_position: int | None = None):
        """`max_position` is ignored (RoPE is computed for each step's positions); callers still pass it."""
        super().__init__()
        self.config = config
        self.rotary = InterleavedRotaryEmbedding(config.head_dim, config.rope_theta)
        rotary = self.rotary
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList(
            [Ernie4_5DecoderLayer(config, rotary, self.make_mlp(i)) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def make_mlp(self, layer_index: int) -> nn.Layer:
        return Ernie4_5MLP(self.config.hidden_size, self.config.intermediate_size)

    def checkpoint_rules(self) -> tuple[TensorRule, ...]:
        return CHECKPOINT_RULES

    def held_weight_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """`weight_shapes` of the weights this rank holds."""
        return weight_shapes(self.config)

    @property
    def kv_cache_shape(self) -> tuple[int, int]:
        """(KV heads, head_dim) held by this rank per cached token and layer."""
        attn = self.layers[0].self_attn
        return attn.num_kv_heads, attn.attn.head_dim

    def forward(self, input_ids, positions, kv_caches, batch: AttentionBatch) -> paddle.Tensor:
        """Logits [num_seqs, vocab] at each sequence's last new token."""
        hidden, rope = self.embed(input_ids, positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(rope, hidden, kv_cache, batch)
        return self.logits(paddle.gather(hidden, batch.last_token_index))

    def embed(self, input_ids, positions) -> tuple[paddle.Tensor, tuple[paddle.Tensor, paddle.Tensor]]:
        """The tokens' embeddings, and the rotary cos and sin [tokens, 1, head_dim] of their positions."""
        return self.embed_tokens(input_ids), self.rotary.lookup(positions)

    def logits(self, hidden: paddle.Tensor) -> paddle.Tensor:
        return self.lm_head(self.norm(hidden))

    def logits_parts(self) -> list[nn.Layer]:
        return [self.norm, self.lm_head]

    def weight_specs(self) -> dict[str, tuple[object, list[tuple[int, ...]]]]:
        """Each weight to load (see `weight_shapes`): the layer whose `load` takes its parts, their shapes."""
        sublayers, rules = dict(self.named_sublayers()), self.checkpoint_rules()
        specs = {
            target: (sublayers[parameter_name(rules, target).rpartition(".")[0]], shapes)
            for target, shapes in self.held_weight_shapes().items()
        }
        if self.config.tie_word_embeddings:  # the embedding's tensor fills the LM head too
            specs["embed_tokens"] = (TiedLoader(self.embed_tokens, self.lm_head), specs["embed_tokens"][1])
        else:
            specs["lm_head"] = (TransposedLoader(self.lm_head), specs["lm_head"][1])
        return specs


Shapes = dict[str, list[tuple[int, ...]]]


def weight_shapes(config: Ernie4_5Config, layer_mlp_shapes: Callable[[int], Shapes] | None = None) -> Shapes:
    """Each weight the model loads (a rule's target) and the full shapes of its parts, as our parameters
    hold them: [in, out], the LM head [hidden, vocab]. The order is the order checkpoints are written in.
    `layer_mlp_shapes(i)`: layer i's MLP weights (default: the dense MLP)."""
    c = config
    q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"embed_tokens": [(c.vocab_size, c.hidden_size)], "norm": [(c.hidden_size,)]}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = [(c.hidden_size, c.vocab_size)]
    for i in range(c.num_hidden_layers):
        shapes |= {
            f"{i}.qkv_proj": [(c.hidden_size, size) for size in (q_size, kv_size, kv_size)],
            f"{i}.o_proj": [(q_size, c.hidden_size)],
        }
        shapes |= (layer_mlp_shapes or (lambda i: mlp_shapes(str(i), c.hidden_size, c.intermediate_size)))(i)
        shapes |= {
            f"{i}.input_layernorm": [(c.hidden_size,)],
            f"{i}.post_attention_layernorm": [(c.hidden_size,)],
        }
    return shapes


def mlp_shapes(target: str, hidden_size: int, intermediate_size: int) -> Shapes:
    """An `Ernie4_5MLP`'s weights; `target` names it ("3" for layer 3's MLP)."""
    return {
        f"{target}.up_gate_proj": [(hidden_size, intermediate_size)] * 2,  # gate, up
        f"{target}.down_proj": [(intermediate_size, hidden_size)],
    }


# The published checkpoint layouts, and the architecture name each one's config.json gives:
#   "paddle" (ERNIE-4.5-*-Paddle): prefix "ernie.", q|k|v and gate|up each fused (contiguous) along the
#     out axis, stored like our parameters: [in, out], the LM head [hidden, vocab].
#   "pt" (ERNIE-4.5-*-PT, transformers' save_pretrained): prefix "model.", one tensor per projection,
#     stored [out, in], the LM head [vocab, hidden].
LAYOUT_ARCHITECTURES = {"paddle": "Ernie4_5_ForCausalLM", "pt": "Ernie4_5ForCausalLM"}


def rule(
    target: str, parameter: str, pt_parts: list[str] | None = None, is_pt_transposed: bool = True
) -> TensorRule:
    """One weight, in our model `parameter`: in -Paddle "ernie." + that name; in -PT "model." + that name,
    or one tensor per part, named "model." + each of `pt_parts` (in order)."""
    pt_names = tuple(f"model.{name}" for name in (pt_parts or [parameter]))
    transposed_in = ("pt",) if is_pt_transposed else ()
    return TensorRule(target, parameter, {"paddle": (f"ernie.{parameter}",), "pt": pt_names}, transposed_in)


def mlp_rules(target: str, path: str) -> tuple[TensorRule, TensorRule]:
    """An `Ernie4_5MLP` at `path` in our model: gate|up fused in -Paddle, gate_proj and up_proj in -PT."""
    return (
        rule(
            f"{target}.up_gate_proj",
            f"{path}.up_gate_proj.weight",
            [f"{path}.{x}_proj.weight" for x in ("gate", "up")],
        ),
        rule(f"{target}.down_proj", f"{path}.down_proj.weight"),
    )


# target (see weight_shapes), our parameter, and how the layouts store it; {i} is a layer index.
CHECKPOINT_RULES = (
    rule("embed_tokens", "embed_tokens.weight", is_pt_transposed=False),
    rule("norm", "norm.weight", is_pt_transposed=False),
    TensorRule(
        "lm_head", "lm_head.weight", {"paddle": ("lm_head.weight",), "pt": ("lm_head.weight",)}, ("pt",)
    ),
    rule(
        "{i}.qkv_proj",
        "layers.{i}.self_attn.qkv_proj.weight",
        [f"layers.{{i}}.self_attn.{x}_proj.weight" for x in ("q", "k", "v")],
    ),
    rule("{i}.o_proj", "layers.{i}.self_attn.o_proj.weight"),
    *mlp_rules("{i}", "layers.{i}.mlp"),
    rule("{i}.input_layernorm", "layers.{i}.input_layernorm.weight", is_pt_transposed=False),
    rule(
        "{i}.post_attention_layernorm", "layers.{i}.post_attention_layernorm.weight", is_pt_transposed=False
    ),
)

CONFIG_CLASS = Ernie4_5Config
MODEL_CLASS = Ernie4_5ForCausalLM
