"""The memory plan (fdkit/engine/memory.py): weights, KV cache and runtime against the machine's memory,
from config.json alone, before any weight file is looked for; and the KV cache sized from it."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
from helpers import TEST_ENGINE

from fdkit import LLM, load_config
from fdkit.engine.memory import GB, RUNTIME_BYTES, PlanError, available_memory, cgroup_available, plan_memory
from fdkit.models import _REGISTRY
from fdkit.tiny import PRESETS, model_config

MOE = dict(
    architectures=["Ernie4_5_MoeForCausalLM"],
    model_type="ernie4_5_moe",
    vocab_size=103424,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    moe_num_experts=64,
    moe_layer_interval=1,
    moe_norm_min=1e-12,
)
# /work/shared/reference_moe_facts.md
A3B = dict(MOE, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20)
A3B |= dict(num_key_value_heads=4, head_dim=128, moe_k=6, moe_intermediate_size=1536)
A3B |= dict(
    moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=27, tie_word_embeddings=True
)
A47B = dict(MOE, hidden_size=8192, intermediate_size=28672, num_hidden_layers=54, num_attention_heads=64)
A47B |= dict(num_key_value_heads=8, head_dim=128, moe_k=8, moe_intermediate_size=3584)
A47B |= dict(
    moe_num_shared_experts=0, moe_layer_start_index=3, moe_layer_end_index=53, tie_word_embeddings=False
)
HOST = int(22.1 * GB)  # what a 24 GB machine has available
needs_moe = pytest.mark.skipif(
    "Ernie4_5_MoeForCausalLM" not in _REGISTRY, reason="the MoE module is not registered yet"
)


def config_only(tmp_path: Path, name: str, raw: dict) -> Path:
    """A model folder holding config.json and nothing else: no weights, no tokenizer."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def plan(folder: Path, *overrides: str, available: int | None = HOST):
    cfg = load_config(["model=ernie", f"model.path={folder}", *overrides])
    return plan_memory(cfg, folder, available_bytes=available)


@needs_moe
def test_21b_in_float32_is_refused_with_what_would_fit(tmp_path):
    folder = config_only(tmp_path, "ERNIE-4.5-21B-A3B-Paddle", A3B)
    with pytest.raises(PlanError) as refused:
        plan(folder)
    message = str(refused.value)
    assert message.startswith("ERNIE-4.5-21B-A3B-Paddle needs 88.4 GB of weights in float32 (+ 0.5 GB KV")
    assert "but this host has 22.1 GB available; it would fit on a host with 91.0 GB" in message
    assert (
        "on GPUs in bfloat16 with 44.9 GB each at tp=1, 22.7 GB each at tp=2, 11.6 GB each at tp=4 or "
        in message
    )
    assert message.endswith("6.1 GB each at tp=8")  # 20 heads need not split evenly
    assert "\n" not in message
    # bfloat16 on CPU is compiled from weights loaded in float32: the plan counts them in float32
    with pytest.raises(PlanError, match=r"needs 88\.4 GB of weights in float32"):
        plan(folder, "engine.dtype=bfloat16")
    with pytest.raises(PlanError, match=r"runtime over 8 ranks\) but this host has 22\.1 GB"):
        plan(folder, "tp=8")


@needs_moe
def test_300b_is_refused_and_told_its_gpus(tmp_path):
    folder = config_only(tmp_path, "ERNIE-4.5-300B-A47B-Paddle", A47B)
    with pytest.raises(PlanError, match=r"needs 1197\.9 GB of weights in float32.*75\.5 GB each at tp=8"):
        plan(folder)
    plan(folder, "engine.device=gpu", "engine.dtype=bfloat16", "tp=8", available=80 * GB)  # fits an 80 GB GPU


def test_llm_refuses_before_looking_for_weights(tmp_path):
    """A dense model of ~1.3T parameters: config.json alone, on this machine's real memory."""
    raw = model_config({**PRESETS["0.3b"], "hidden_size": 16384, "intermediate_size": 53248}, "paddle")
    folder = config_only(tmp_path, "huge", {**raw, "num_hidden_layers": 120, "num_attention_heads": 128})
    with pytest.raises(
        PlanError, match=r"huge needs \d+\.\d GB of weights in float32 .* it would fit on a host"
    ):
        LLM(folder)


def test_weights_are_counted_as_the_model_holds_them(llm):
    """The linear layers hold only their packed weights (fdkit/kernels/linear.cc), float32 here: the
    plan's one float32 copy of every parameter (a tied LM head keeps its own copy) is the bytes held."""
    from fdkit.parallel import held_weight_bytes

    model = llm.engine.runner.model
    held = held_weight_bytes(model)
    assert held > 2 * sum(int(p.size) * 4 for p in model.parameters())  # packed layers: most of the model
    assert llm.memory_plan.num_weight_copies == 1
    assert llm.memory_plan.weight_bytes == 4 * llm.memory_plan.model.num_parameters == held
    assert llm.engine.block_manager.num_blocks == TEST_ENGINE["num_kv_blocks"]  # tests' small engines


def test_kv_cache_is_sized_from_memory(tmp_path):
    folder = config_only(tmp_path, "ERNIE-4.5-0.3B-Paddle", model_config(PRESETS["0.3b"], "paddle"))
    short = plan(folder, "engine.max_model_len=4096")  # max_num_seqs 32 full-length sequences at most
    assert short.num_kv_blocks == 32 * 4096 // 64 and short.block_bytes == 2 * 18 * 2 * 128 * 64 * 4
    default = plan(folder)  # the model's 131072 tokens: the KV cache by memory holds them all
    assert default.max_model_len == 131072 and default.num_kv_blocks * 64 >= 131072
    long = plan(folder, "engine.max_model_len=32768")  # FastDeploy's --max-model-len 32768: by memory
    left = HOST - long.weight_bytes - RUNTIME_BYTES
    assert long.num_kv_blocks == int(0.5 * left) // long.block_bytes >= 32768 // 64
    assert "max_model_len 32768" in long.summary() and f"{long.num_kv_blocks} blocks of 64" in long.summary()
    assert plan(folder, "engine.memory_utilization=0.25", "engine.max_model_len=32768").num_kv_blocks < (
        long.num_kv_blocks
    )
    assert plan(folder, "engine.kv_cache_gib=1").num_kv_blocks == 2**30 // short.block_bytes
    assert plan(folder, "engine.num_kv_blocks=100", "engine.kv_cache_gib=1").num_kv_blocks == 100
    tp2 = plan(folder, "tp=2", "engine.max_model_len=32768")  # the ranks share the host
    assert tp2.num_kv_blocks * tp2.block_bytes < long.num_kv_blocks * long.block_bytes


def test_kv_cache_too_small_for_max_model_len(tmp_path):
    folder = config_only(tmp_path, "m", model_config(PRESETS["0.3b"], "paddle"))
    with pytest.raises(PlanError, match=r"\(\d+ tokens\) per rank, fewer than max_model_len 131072 needs"):
        plan(folder, "engine.max_model_len=131072", available=10 * GB)  # fits, but not at 0.5 of it
    with pytest.raises(PlanError, match="needs 64: raise engine.kv_cache_gib"):
        plan(folder, "engine.num_kv_blocks=8", "engine.max_model_len=4096")


def test_dtype_and_batch_limits_the_machine_cannot_run(tmp_path):
    folder = config_only(tmp_path, "m", model_config(PRESETS["tiny"], "paddle"))
    with pytest.raises(PlanError, match="float16 cannot run on CPU: paddle 3.3.1 has no CPU kernels"):
        plan(folder, "engine.dtype=float16")
    with pytest.raises(PlanError, match=r"bfloat16 on CPU needs the compiled step \(engine.compile=true\)"):
        plan(folder, "engine.dtype=bfloat16", "engine.compile=false")
    no_bf16 = mock.patch("fdkit.engine.memory.cpu_has_bfloat16", return_value=False)
    with no_bf16, pytest.raises(PlanError, match="bfloat16 on CPU needs a CPU with avx512_bf16 or AMX"):
        plan(folder, "engine.dtype=bfloat16")
    assert (
        plan(folder, "engine.dtype=bfloat16", "engine.compile=false", "engine.device=gpu").dtype == "bfloat16"
    )
    # prompts are prefilled in chunks: a step's token budget may be below max_model_len
    assert (
        plan(folder, "engine.max_num_batched_tokens=256", "engine.max_model_len=4096").max_model_len == 4096
    )


def test_the_models_max_model_len_is_lowered_to_what_the_kv_cache_holds(tmp_path, caplog):
    caplog.set_level("WARNING", logger="fdkit.engine.memory")
    folder = config_only(tmp_path, "m", model_config(PRESETS["0.3b"], "paddle"))
    lowered = plan(folder, available=6 * GB)  # 0.5 of what the weights leave: fewer than 131072 tokens
    assert lowered.max_model_len == lowered.num_kv_blocks * 64 < 131072
    assert f"max_model_len lowered from the model's 131072 to {lowered.max_model_len} tokens" in caplog.text
    assert plan(folder, "engine.num_kv_blocks=100").max_model_len == 6400


@needs_moe
@pytest.mark.parametrize(("tp", "kv_heads"), [(1, 4), (2, 2), (3, 2), (4, 1), (8, 2), (32, 1)])
def test_any_tp_with_the_kv_heads_its_ranks_hold(tmp_path, tp, kv_heads):
    """21B-A3B's 20 heads in groups of 5 per KV head: at tp=8 (3,3,3,3,2,2,2,2) rank 1 holds heads 3-5,
    which read KV heads 0 and 1; the plan counts the most any rank holds."""
    folder = config_only(tmp_path, "a3b", A3B)
    planned = plan(folder, f"tp={tp}", "engine.device=gpu", "engine.dtype=bfloat16", available=80 * GB)
    assert planned.block_bytes == 2 * 28 * kv_heads * 128 * 64 * 2


def test_default_server_fits(tmp_path):
    demo = plan(Path(load_config().model.path), available=HOST)
    # max_model_len is the demo model's 512: 32 full-length sequences of 8 blocks
    assert (
        demo.max_model_len == 512
        and demo.num_kv_blocks == 32 * 8
        and demo.needed_bytes(demo.num_kv_blocks) < 1 * GB
    )


def fake_cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def test_a_container_memory_limit_bounds_what_is_available(tmp_path):
    v2 = {"memory.max": str(3 * GB), "memory.current": str(GB), "memory.stat": "anon 1\ninactive_file 1000"}
    assert cgroup_available(fake_cgroup(tmp_path / "v2", v2)) == 2 * GB + 1000
    v1 = {"memory/memory.limit_in_bytes": str(4 * GB), "memory/memory.usage_in_bytes": str(GB)}
    assert cgroup_available(fake_cgroup(tmp_path / "v1", v1)) == 3 * GB
    both = fake_cgroup(tmp_path / "both", {**v1, "memory.max": str(2 * GB), "memory.current": str(GB)})
    assert cgroup_available(both) == GB  # the smaller
    assert available_memory("cpu", cgroup_root=both) == GB
    unlimited = {"memory.max": "max", "memory.current": str(GB)}
    unlimited |= {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "1"}
    assert cgroup_available(fake_cgroup(tmp_path / "none", unlimited)) is None
    assert cgroup_available(tmp_path / "missing") is None
    assert available_memory("cpu", cgroup_root=tmp_path / "missing") > GB  # the host's, as psutil says
