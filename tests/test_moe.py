"""ERNIE 4.5 MoE against transformers' Ernie4_5_MoeForCausalLM (reference data in tests/data/moe_reference,
made by its make_reference.py), in both checkpoint layouts, batched, tensor- and expert-parallel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TEST_ENGINE
from test_fidelity import logits_after_decode, logits_of

from fdkit import LLM, SamplingParams
from fdkit.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    CheckpointReader,
    read_config,
    save_checkpoint,
    save_safetensors,
)
from fdkit.models import ernie4_5_moe
from fdkit.models.loader import load_weights, rank_parameter_shapes
from fdkit.parallel import rank_view

REFERENCE = Path(__file__).parent / "data" / "moe_reference"
NUM_PROMPTS = 4
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE / "reference.npz"))


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
    return [reference[f"prompt_{p}"].tolist() for p in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def reference_paddle(tmp_path_factory) -> Path:
    """transformers' -PT checkpoint, loaded and written again in the -Paddle layout by our writer."""
    folder = tmp_path_factory.mktemp("moe") / "reference_paddle"
    # dygraph: a compiled MoE step hands its dense weights to its programs and keeps no copy
    with LLM(REFERENCE / "tiny_moe_pt", **TEST_ENGINE, compile=False) as llm:
        state = {name: p.numpy() for name, p in llm.engine.runner.model.named_parameters()}
    shutil.copytree(REFERENCE / "tiny_moe_pt", folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_checkpoint(
        folder, state, ernie4_5_moe, read_config(REFERENCE / "tiny_moe_pt"), "paddle", num_shards=2
    )
    return folder


@pytest.fixture(scope="module")
def tp1(reference_paddle):
    with LLM(reference_paddle, **TEST_ENGINE) as llm:
        yield llm


def test_layouts_as_published(reference_paddle):
    pt, paddle = CheckpointReader(REFERENCE / "tiny_moe_pt"), CheckpointReader(reference_paddle)
    layer = "layers.1.mlp"
    assert pt.shape(f"model.{layer}.gate.weight") == (8, 64) and paddle.shape(
        f"ernie.{layer}.gate.weight"
    ) == (64, 8)
    np.testing.assert_array_equal(
        paddle.get(f"ernie.{layer}.gate.weight"), pt.get(f"model.{layer}.gate.weight").T
    )
    bias = f"{layer}.moe_statics.e_score_correction_bias"
    np.testing.assert_array_equal(paddle.get(f"ernie.{bias}"), pt.get(f"model.{bias}"))
    assert (
        np.abs(pt.get(f"model.{bias}")).min() > 0
    )  # the reference's bias is random, not transformers' zeros
    for expert in ("experts.5", "shared_experts"):
        gate_up = [pt.get(f"model.{layer}.{expert}.{x}_proj.weight").T for x in ("gate", "up")]
        fused = paddle.get(f"ernie.{layer}.{expert}.up_gate_proj.weight")
        np.testing.assert_array_equal(fused, np.concatenate(gate_up, axis=1))  # gate half first
        down = pt.get(f"model.{layer}.{expert}.down_proj.weight").T
        np.testing.assert_array_equal(paddle.get(f"ernie.{layer}.{expert}.down_proj.weight"), down)


@pytest.mark.parametrize("layout", ["pt", "paddle"])
def test_logits_and_greedy_match_transformers(layout, reference_paddle, reference, prompts):
    folder = REFERENCE / "tiny_moe_pt" if layout == "pt" else reference_paddle
    with LLM(folder, **TEST_ENGINE) as llm:
        for p, prompt in enumerate(prompts):
            for length in (1, len(prompt) // 2, len(prompt)):  # prefill of each prefix
                ours = logits_of(llm, prompt[:length])
                np.testing.assert_allclose(ours, reference[f"logits_{p}"][length - 1], atol=1e-4, rtol=0)
            greedy = reference[f"greedy_{p}"].tolist()
            decoded = logits_after_decode(llm, prompt, greedy[:3])  # decode steps over the paged cache
            np.testing.assert_allclose(decoded, reference[f"greedy_logits_{p}"][3], atol=1e-4, rtol=0)
            assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids == greedy


def test_any_batch_mix_matches_each_alone(tp1, prompts, reference):
    together = tp1.generate(prompts, GREEDY, use_tqdm=False)
    pairs = tp1.generate(prompts[2:] + prompts[:2], GREEDY, use_tqdm=False)
    for p, prompt in enumerate(prompts):
        alone = tp1.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
        assert alone == together[p].token_ids == pairs[(p - 2) % NUM_PROMPTS].token_ids
        assert alone == reference[f"greedy_{p}"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_tensor_and_expert_parallel_match_tp1(expert_parallel, reference_paddle, tp1, prompts):
    overrides = [f"engine.{k}={v}" for k, v in TEST_ENGINE.items()]
    overrides += [
        "model=ernie",
        f"model.path={reference_paddle}",
        "tp=2",
        f"engine.expert_parallel={expert_parallel}",
    ]
    with LLM.from_config(overrides) as tp2:
        got = tp2.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in tp1.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.slow
def test_more_ranks_than_heads_match_the_reference(prompts, reference):
    """The issue's launch: ERNIE-4.5-21B-A3B's config at tp=8, on a checkpoint of 4 heads (2 KV heads)."""
    overrides = ["model=ernie_21b_a3b", f"model.path={REFERENCE / 'tiny_moe_pt'}", "tp=8"]
    with LLM.from_config(overrides + [f"engine.{k}={v}" for k, v in TEST_ENGINE.items()]) as tp8:
        got = tp8.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == [reference[f"greedy_{p}"].tolist() for p in range(NUM_PROMPTS)]


def rank_model(folder: Path, rank: int, expert_parallel: bool):
    """Rank `rank` of 2, built and loaded in this process (no collectives run)."""
    config = ernie4_5_moe.CONFIG_CLASS.from_dict(read_config(folder))
    with rank_view(2, expert_parallel, rank):
        model = ernie4_5_moe.MODEL_CLASS(config, max_position=16)
        load_weights(model, ernie4_5_moe, folder, show_progress=False)
    return model


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_each_rank_holds_its_part_of_the_experts(expert_parallel, reference_paddle):
    full = CheckpointReader(reference_paddle)
    for rank in (0, 1):
        mlp = rank_model(reference_paddle, rank, expert_parallel).layers[1].mlp
        held = [int(e) for e in mlp.experts]
        assert held == ([4 * rank + e for e in range(4)] if expert_parallel else list(range(8)))
        weight = full.get(f"ernie.layers.1.mlp.experts.{held[1]}.down_proj.weight")  # [32, 64]
        expected = weight if expert_parallel else weight[16 * rank : 16 * (rank + 1)]  # rows split
        np.testing.assert_array_equal(mlp.experts[str(held[1])].down_proj.weight.numpy(), expected)
        shared = full.get("ernie.layers.1.mlp.shared_experts.down_proj.weight")
        np.testing.assert_array_equal(
            mlp.shared_experts.down_proj.weight.numpy(), shared[16 * rank : 16 * (rank + 1)]
        )
        np.testing.assert_array_equal(mlp.gate.weight.numpy(), full.get("ernie.layers.1.mlp.gate.weight"))


def test_rank_parameter_shapes():
    raw = read_config(REFERENCE / "tiny_moe_pt")
    tp1, tp4 = rank_parameter_shapes(raw), rank_parameter_shapes(raw, world_size=4)
    assert tp1["layers.1.mlp.experts.7.up_gate_proj.weight"] == (64, 64)
    assert tp4["layers.1.mlp.experts.7.up_gate_proj.weight"] == (64, 16)  # gate and up: 8 columns each
    assert tp4["layers.0.self_attn.qkv_proj.weight"] == (64, 16 + 2 * 16)  # 1 query head; KV heads replicated
    assert tp4["layers.1.mlp.gate.weight"] == (64, 8)
    for rank in (0, 7):  # 4 heads over 8 ranks: one query head and its KV head each
        tp8 = rank_parameter_shapes(raw, world_size=8, rank=rank)
        assert tp8["layers.0.self_attn.qkv_proj.weight"] == (64, 3 * 16)
        assert tp8["layers.0.self_attn.o_proj.weight"] == (16, 64)
    uneven = raw | {"num_attention_heads": 20, "num_key_value_heads": 4, "head_dim": 8}
    qkv = [rank_parameter_shapes(uneven, 8, rank=r)["layers.0.self_attn.qkv_proj.weight"] for r in (0, 1, 7)]
    assert qkv == [(64, 8 * (3 + 1 + 1)), (64, 8 * (3 + 2 + 2)), (64, 8 * (2 + 1 + 1))]
    ep = rank_parameter_shapes(raw, world_size=4, expert_parallel=True)
    assert [name for name in ep if name.endswith("down_proj.weight") and ".1.mlp.experts." in name] == [
        "layers.1.mlp.experts.0.down_proj.weight",
        "layers.1.mlp.experts.1.down_proj.weight",
    ]
    assert ep["layers.1.mlp.experts.1.down_proj.weight"] == (32, 64)


def add_tensors(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    """Another shard with `tensors`, listed in the index."""
    save_safetensors(tensors, folder / "extra.safetensors")
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"] |= dict.fromkeys(tensors, "extra.safetensors")
    (folder / INDEX_FILE).write_text(json.dumps(index))


def test_mtp_tensors_are_skipped(reference_paddle, tmp_path, prompts, reference):
    folder = tmp_path / "with_mtp"
    shutil.copytree(reference_paddle, folder)
    mtp = [
        "mtp_block.0.self_attn.qkv_proj",
        "mtp_block.0.mlp.up_gate_proj",
        "mtp_emb_norm.0",
        "mtp_hidden_norm.0",
    ]
    add_tensors(
        folder,
        {f"ernie.{name}.weight": np.ones((64, 64), np.float32) for name in [*mtp, "mtp_linear_proj.0"]},
    )
    with LLM(folder, **TEST_ENGINE) as llm:
        assert (
            llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0].token_ids == reference["greedy_0"].tolist()
        )


def test_multimodal_checkpoint_is_refused_by_name(reference_paddle, tmp_path):
    folder = tmp_path / "vl"
    shutil.copytree(reference_paddle, folder)
    add_tensors(folder, {"ernie.layers.1.mlp.gate.weight_1": np.ones((64, 8), np.float32)})
    with pytest.raises(
        CheckpointError, match=r"multimodal \(VL\).*not supported yet.*layers\.1\.mlp\.gate\.weight_1"
    ):
        LLM(folder, **TEST_ENGINE)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"moe_num_experts": [8, 8]}))
    with pytest.raises(CheckpointError, match=r"multimodal \(VL\)"):
        LLM(folder, **TEST_ENGINE)


@pytest.mark.parametrize(
    ("start", "end", "interval", "expected"),
    [
        (1, 2, 1, [1, 2]),
        (1, -1, 1, [1, 2, 3, 4, 5]),
        (3, 5, 1, [3, 4, 5]),
        (0, -1, 2, [1, 3, 5]),
        (1, 3, 2, [1, 3]),
    ],
)
def test_which_layers_are_moe(start, end, interval, expected):
    """As transformers' Ernie4_5_MoeDecoderLayer: start <= i <= end (-1: last), (i + 1) % interval == 0."""
    raw = read_config(REFERENCE / "tiny_moe_pt") | {"num_hidden_layers": 6}
    raw |= {"moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": interval}
    config = ernie4_5_moe.CONFIG_CLASS.from_dict(raw)
    assert [i for i in range(6) if config.is_moe_layer(i)] == expected
