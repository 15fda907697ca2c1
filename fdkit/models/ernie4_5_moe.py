"""ERNIE 4.5 MoE (e.g. ERNIE-4.5-21B-A3B, -300B-A47B): the dense model's decoder, with routed experts in
the MLP of the layers the config names; the model, and how its published checkpoints name tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from fdkit.checkpoint import CheckpointError, TensorRule
from fdkit.models import ernie4_5
from fdkit.models.ernie4_5 import (
    Ernie4_5Config,
    Ernie4_5ForCausalLM,
    Ernie4_5MLP,
    mlp_rules,
    mlp_shapes,
    rule,
)
from fdkit.models.layers import RoutedExperts
from fdkit.parallel import all_reduce, assign

ARCHITECTURES = ("Ernie4_5_MoeForCausalLM",)
MODEL_TYPES = ("ernie4_5_moe",)
DEFAULT_CHAT_TEMPLATE = ernie4_5.DEFAULT_CHAT_TEMPLATE
ZEROS = nn.initializer.Constant(0.0)


@dataclass
class Ernie4_5_MoeConfig(Ernie4_5Config):
    moe_num_experts: int
    moe_k: int  # experts per token
    moe_intermediate_size: int  # of each routed expert
    moe_num_shared_experts: int  # the shared expert's width is moe_intermediate_size times this
    moe_layer_start_index: int
    moe_layer_end_index: int
    moe_layer_interval: int
    moe_norm_min: float  # floor of the sum of a token's routing weights, which are divided by it

    @classmethod
    def from_dict(cls, raw: dict) -> Ernie4_5_MoeConfig:
        ernie4_5.check_model(raw, ARCHITECTURES, MODEL_TYPES, "ERNIE 4.5 MoE models")
        if isinstance(raw.get("moe_num_experts"), list):  # [text experts, vision experts]
            raise CheckpointError(
                f"moe_num_experts={raw.get('moe_num_experts')!r}: multimodal (VL) ERNIE 4.5 checkpoints, "
                "with text and vision experts, are not supported yet"
            )
        end = raw.get("moe_layer_end_index", -1)  # defaults as transformers' and paddleformers' configs
        return cls(
            **ernie4_5.decoder_fields(raw),
            moe_num_experts=raw["moe_num_experts"],
            moe_k=raw["moe_k"],
            moe_intermediate_size=raw["moe_intermediate_size"],
            moe_num_shared_experts=raw.get("moe_num_shared_experts", 2),
            moe_layer_start_index=raw.get("moe_layer_start_index", 1),
            moe_layer_end_index=raw["num_hidden_layers"] - 1 if end == -1 else end,
            moe_layer_interval=raw.get("moe_layer_interval", 1),
            moe_norm_min=float(raw.get("moe_norm_min", 1e-12)),
        )

    def is_moe_layer(self, i: int) -> bool:
        start, end = self.moe_layer_start_index, self.moe_layer_end_index
        return start <= i <= end and (i + 1) % self.moe_layer_interval == 0


class Ernie4_5_MoeGate(nn.Layer):
    """The router's weight [hidden, experts], whole on every rank and float32 whatever the model's dtype."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = self.create_parameter(
            [hidden_size, num_experts], dtype="float32", default_initializer=ZEROS
        )

    def load(self, parts: list[np.ndarray], name: str) -> None:
        assign(self.weight, parts[0], name)


class Ernie4_5_MoeStatics(nn.Layer):
    """The routing correction bias [1, experts] (float32): added to the probabilities to choose experts."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = self.create_parameter(
            [1, num_experts], dtype="float32", default_initializer=ZEROS
        )

    def load(self, parts: list[np.ndarray], name: str) -> None:
        assign(self.e_score_correction_bias, parts[0], name)


class Ernie4_5_MoeBlock(nn.Layer):
    """The MLP of a MoE layer: each token's top-k routed experts, weighted, plus the shared expert."""

    is_compilable = False  # routing picks experts on the host (numpy): a compiled step runs it in dygraph

    def __init__(self, config: Ernie4_5_MoeConfig):
        super().__init__()
        c = config
        self.gate = Ernie4_5_MoeGate(c.hidden_size, c.moe_num_experts)
        self.moe_statics = Ernie4_5_MoeStatics(c.moe_num_experts)
        self.experts = RoutedExperts(
            c.moe_num_experts,
            lambda is_split: Ernie4_5MLP(c.hidden_size, c.moe_intermediate_size, is_split, is_reduced=False),
        )
        shared_size = c.moe_intermediate_size * c.moe_num_shared_experts
        self.shared_experts = (
            Ernie4_5MLP(c.hidden_size, shared_size, is_reduced=False) if shared_size else None
        )
        self.num_experts_per_token, self.norm_min = c.moe_k, c.moe_norm_min

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        weights, expert_ids = self.route(x)
        out = self.experts(x, weights, expert_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return all_reduce(out)  # each rank's part of the routed and shared outputs, summed at once

    def route(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Each token's experts [tokens, k] and their weights (float32): the top k of the probabilities
        plus the correction bias, weighted by the probabilities alone, normalized to sum to 1."""
        h = x if x.dtype == paddle.float32 else x.astype("float32")
        probs = F.softmax(paddle.matmul(h, self.gate.weight), axis=-1)
        _, expert_ids = paddle.topk(
            probs + self.moe_statics.e_score_correction_bias, self.num_experts_per_token
        )
        weights = paddle.take_along_axis(probs, expert_ids, axis=-1)
        return weights / weights.sum(axis=-1, keepdim=True).clip(min=self.norm_min), expert_ids


class Ernie4_5_MoeForCausalLM(Ernie4_5ForCausalLM):
    config: Ernie4_5_MoeConfig

    def make_mlp(self, layer_index: int) -> nn.Layer:
        if self.config.is_moe_layer(layer_index):
            return Ernie4_5_MoeBlock(self.config)
        return super().make_mlp(layer_index)

    def checkpoint_rules(self) -> tuple[TensorRule, ...]:
        return CHECKPOINT_RULES

    def held_weight_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """`weight_shapes`, less the experts other ranks hold (expert parallel)."""
        return {
            target: shapes for target, shapes in weight_shapes(self.config).items() if self._holds(target)
        }

    def _holds(self, target: str) -> bool:
        parts = target.split(".")  # an expert's: "{i}.experts.{e}.*"
        return len(parts) < 3 or parts[1] != "experts" or parts[2] in self.layers[int(parts[0])].mlp.experts


def weight_shapes(config: Ernie4_5_MoeConfig) -> dict[str, list[tuple[int, ...]]]:
    """As `ernie4_5.weight_shapes`; a MoE layer's MLP: the gate [hidden, experts], the correction bias
    [1, experts], each routed expert's and the shared expert's MLP weights."""
    return ernie4_5.weight_shapes(config, lambda i: _mlp_shapes(config, i))


def _mlp_shapes(config: Ernie4_5_MoeConfig, i: int) -> dict[str, list[tuple[int, ...]]]:
    c = config
    if not c.is_moe_layer(i):
        return mlp_shapes(str(i), c.hidden_size, c.intermediate_size)
    shapes = {
        f"{i}.gate": [(c.hidden_size, c.moe_num_experts)],
        f"{i}.e_score_correction_bias": [(1, c.moe_num_experts)],
    }
    for e in range(c.moe_num_experts):
        shapes |= mlp_shapes(f"{i}.experts.{e}", c.hidden_size, c.moe_intermediate_size)
    if c.moe_num_shared_experts:
        shapes |= mlp_shapes(
            f"{i}.shared_experts", c.hidden_size, c.moe_intermediate_size * c.moe_num_shared_experts
        )
    return shapes


# Both published layouts (see ernie4_5) name the architecture alike.
LAYOUT_ARCHITECTURES = {"paddle": "Ernie4_5_MoeForCausalLM", "pt": "Ernie4_5_MoeForCausalLM"}

# The dense model's table, plus the MoE layers' weights; {e} is an expert's index. The -Paddle gate is
# [hidden, experts], the -PT gate [experts, hidden]; the bias is [1, experts] in both. The multi-token
# prediction (MTP) weights (`*mtp_block*`, `mtp_emb_norm`, `mtp_hidden_norm`, `mtp_linear_proj`) match no
# rule: they are not loaded.
CHECKPOINT_RULES = (
    *ernie4_5.CHECKPOINT_RULES,
    rule("{i}.gate", "layers.{i}.mlp.gate.weight"),
    rule(
        "{i}.e_score_correction_bias",
        "layers.{i}.mlp.moe_statics.e_score_correction_bias",
        is_pt_transposed=False,
    ),
    *mlp_rules("{i}.experts.{e}", "layers.{i}.mlp.experts.{e}"),
    *mlp_rules("{i}.shared_experts", "layers.{i}.mlp.shared_experts"),
)

# Tensors of checkpoints this module cannot serve (glob patterns), by what they belong to.
UNSUPPORTED_TENSORS = {
    "multimodal (VL) ERNIE 4.5 checkpoints": ("*.mlp.gate.weight_1", "vision_model.*", "resampler_model.*"),
}

CONFIG_CLASS = Ernie4_5_MoeConfig
MODEL_CLASS = Ernie4_5_MoeForCausalLM
