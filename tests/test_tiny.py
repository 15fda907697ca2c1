"""The random-checkpoint presets of fdkit.tiny: the MoE ones as specified, and the dense twin of small-moe."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import TEST_ENGINE

from fdkit import LLM, SamplingParams
from fdkit.checkpoint import CheckpointReader, read_config
from fdkit.models import model_module
from fdkit.tiny import PRESETS, model_config, write_checkpoint


def active_parameters(preset: str) -> int:
    """Parameters a token passes through: all but the routed experts it is not sent to."""
    raw = model_config(PRESETS[preset], "paddle")
    module = model_module(raw)
    config = module.CONFIG_CLASS.from_dict(raw)
    sizes = {t: sum(math.prod(s) for s in parts) for t, parts in module.weight_shapes(config).items()}
    routed = sum(size for target, size in sizes.items() if ".experts." in target)
    share_used = getattr(config, "moe_k", 0) / getattr(config, "moe_num_experts", 1)
    return sum(sizes.values()) - round(routed * (1 - share_used))


def test_small_dense_is_small_moe_with_the_same_active_parameters():
    moe, dense = PRESETS["small-moe"], PRESETS["small-dense"]
    assert (
        dense["intermediate_size"]
        == (moe["moe_k"] + moe["moe_num_shared_experts"]) * moe["moe_intermediate_size"]
    )
    num_routers = moe["num_hidden_layers"] - 1  # the first layer is dense
    router_size = (moe["hidden_size"] + 1) * moe["moe_num_experts"]  # gate and correction bias
    assert active_parameters("small-moe") - active_parameters("small-dense") == num_routers * router_size


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_moe")
    return {layout: write_checkpoint(root / layout, "tiny-moe", layout) for layout in ("paddle", "pt")}


def test_tiny_moe_config_as_specified(tiny_moe):
    config = read_config(tiny_moe["pt"])
    assert config["architectures"] == ["Ernie4_5_MoeForCausalLM"] and config["model_type"] == "ernie4_5_moe"
    expected = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=3)
    expected |= dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    expected |= dict(rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    expected |= dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1)
    expected |= dict(moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1, moe_norm_min=1e-12)
    assert {key: config[key] for key in expected} == expected
    bias = CheckpointReader(tiny_moe["pt"]).get("model.layers.2.mlp.moe_statics.e_score_correction_bias")
    assert bias.shape == (1, 8) and np.all(bias != 0)


def test_tiny_moe_layouts_agree(tiny_moe):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = []
    for folder in tiny_moe.values():
        with LLM(folder, **TEST_ENGINE) as llm:
            outputs.append(
                [o.token_ids for o in llm.generate(["Hello world", "你好"], greedy, use_tqdm=False)]
            )
    assert outputs[0] == outputs[1] and len(set(outputs[0][0])) > 4
