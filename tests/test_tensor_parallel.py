"""tp=2 on this CPU: rank processes, gloo collectives, the same answers as tp=1; and heads that do not
split evenly (20 over 3 or 8 ranks, 4 over 8)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import paddle
import pytest
from helpers import TEST_ENGINE
from server_utils import ROOT

from fdkit import LLM, SamplingParams
from fdkit.checkpoint import CheckpointReader, read_config
from fdkit.models import model_module
from fdkit.models.layers import AttentionBatch
from fdkit.models.loader import load_weights
from fdkit.parallel import rank_view
from fdkit.tiny import write_checkpoint

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "你好，世界",
    "1234+5678=",
    "a b c d e f g h",
]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is as good as gone
        return f.read().split()[2] != "Z"


@pytest.fixture(scope="module")
def tp1(tiny_paddle):
    with LLM(tiny_paddle, **TEST_ENGINE) as llm:
        yield llm


def tp_engine(folder: Path, tp: int, model: str = "ernie") -> LLM:
    return LLM.from_config(
        [
            f"model={model}",
            f"model.path={folder}",
            f"tp={tp}",
            *[f"engine.{k}={v}" for k, v in TEST_ENGINE.items()],
        ]
    )


def assert_same_greedy(got, expected) -> None:
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for a, b in zip(got, expected, strict=True):
        # fp32 all-reduce sums the partial products in another order: rounding only (see note)
        np.testing.assert_allclose([lp for lp, _ in a.logprobs], [lp for lp, _ in b.logprobs], atol=1e-4)
        np.testing.assert_allclose(
            [[v for _, v in top] for _, top in a.logprobs],
            [[v for _, v in top] for _, top in b.logprobs],
            atol=1e-4,
        )


@pytest.fixture(scope="module")
def tp2(tiny_paddle):
    llm = tp_engine(tiny_paddle, 2)
    yield llm
    pids = llm.engine.rank_pids
    llm.close()
    assert not any(is_alive(pid) for pid in pids)


def test_two_ranks_each_hold_half(tp1, tp2):
    assert len(tp2.engine.rank_pids) == 2 and all(is_alive(pid) for pid in tp2.engine.rank_pids)
    from fdkit.parallel import held_weight_bytes

    total = held_weight_bytes(tp1.engine.runner.model) // 4  # float32, packed linear layers included
    assert total == tp1.memory_plan.model.num_parameters
    for rank in tp2.engine.rank_info:
        # norms are replicated, everything else split: a shade over half
        assert 0.5 * total <= rank["num_parameters"] <= 0.52 * total


def test_greedy_outputs_and_logprobs_match_tp1(tp1, tp2):
    assert_same_greedy(
        tp2.generate(PROMPTS, GREEDY, use_tqdm=False), tp1.generate(PROMPTS, GREEDY, use_tqdm=False)
    )


def test_seeded_sampling_matches_tp1(tp1, tp2):
    sampled = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=7, ignore_eos=True)
    assert [o.token_ids for o in tp2.generate(PROMPTS, sampled, use_tqdm=False)] == [
        o.token_ids for o in tp1.generate(PROMPTS, sampled, use_tqdm=False)
    ]


def test_two_engines_side_by_side(tiny_paddle, tp2):
    """A second tp=2 engine on the same host picks its own ports."""
    other = tp_engine(tiny_paddle, 2)
    try:
        out = other.generate("hi", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
        assert len(out.token_ids) == 3
    finally:
        pids = other.engine.rank_pids
        other.close()
    assert not any(is_alive(pid) for pid in pids)


@pytest.fixture(scope="module")
def tp2_server(tiny_paddle, tmp_path_factory):
    from server_utils import launch

    srv = launch(tiny_paddle, tmp_path_factory.mktemp("tp2") / "server.log", "tp=2")
    yield srv
    srv.stop()


def test_server_with_tp2_chats_and_streams(tp2_server):
    import openai

    client = openai.OpenAI(base_url=tp2_server.base_url + "/v1", api_key="null", max_retries=0)
    messages = [{"role": "user", "content": "Hello!"}]
    full = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=10)
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(
            model="x", messages=messages, temperature=0, max_tokens=10, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_killing_a_rank_fails_requests_and_health(tiny_paddle, tmp_path):
    from server_utils import launch

    srv = launch(tiny_paddle, tmp_path / "server.log", "tp=2")
    try:
        found = re.search(
            r"tensor-parallel engine ready: 2 ranks, pids \[(\d+), (\d+)\]", srv.log_path.read_text()
        )
        ranks = [int(found.group(1)), int(found.group(2))]
        body = {"prompt": "hi", "max_tokens": 400, "stream": True, "ignore_eos": True}
        start = time.time()
        lines = []
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    os.kill(ranks[-1], signal.SIGKILL)
        assert lines[-1] == "data: [DONE]" and any('"error"' in line for line in lines)
        assert time.time() - start < 30
        assert httpx.get(srv.base_url + "/health").status_code == 503
        response = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
    finally:
        srv.stop()
    time.sleep(1)
    assert not any(is_alive(pid) for pid in ranks)


def test_no_rank_outlives_a_killed_parent(tiny_paddle):
    """SIGKILL leaves the parent no chance to clean up: the ranks must go by themselves."""
    import subprocess
    import sys

    script = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT / "tests")!r})
from helpers import TEST_ENGINE
from server_utils import ROOT
from fdkit import LLM
llm = LLM.from_config(["model=ernie", "model.path={tiny_paddle}", "tp=2",
                       *[f"engine.{{k}}={{v}}" for k, v in TEST_ENGINE.items()]])
print("PIDS", *llm.engine.rank_pids, flush=True)
time.sleep(120)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = next(line for line in parent.stdout if line.startswith("PIDS"))
        ranks = [int(pid) for pid in line.split()[1:]]
        assert all(is_alive(pid) for pid in ranks)
        parent.kill()
        parent.wait(10)
        deadline = time.time() + 10
        while any(is_alive(pid) for pid in ranks) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(is_alive(pid) for pid in ranks)
    finally:
        parent.kill()


@pytest.fixture(scope="module")
def tiny_20h(tmp_path_factory) -> Path:
    """20 query heads, 4 KV heads (groups of 5), as ERNIE-4.5-21B-A3B."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_20h", "tiny-20h", "paddle", seed=0)


@pytest.fixture(scope="module")
def tp1_20h(tiny_20h):
    with LLM(tiny_20h, **TEST_ENGINE) as llm:
        yield llm


@pytest.mark.parametrize("tp", [8, 3])
def test_uneven_heads_match_tp1(tp, tiny_20h, tp1_20h):
    with tp_engine(tiny_20h, tp) as llm:
        got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_same_greedy(got, tp1_20h.generate(PROMPTS, GREEDY, use_tqdm=False))


def rank_attentions(folder: Path, world_size: int) -> list:
    """Layer 0's attention of each rank of `world_size`, built and loaded in this process."""
    module = model_module(read_config(folder))
    config = module.CONFIG_CLASS.from_dict(read_config(folder))
    attentions = []
    for rank in range(world_size):
        with rank_view(world_size, rank=rank):
            model = module.MODEL_CLASS(config, max_position=16)
            load_weights(model, module, folder, show_progress=False)
        attentions.append(model.layers[0].self_attn)
    return attentions


def attention_output(attention, hidden: paddle.Tensor) -> np.ndarray:
    """One sequence of all its tokens, without cache; outside rank_view the all-reduce is a no-op, so
    this is the rank's part of the sum."""
    n = hidden.shape[0]
    positions = paddle.to_tensor(np.arange(n, dtype=np.int64))
    batch = AttentionBatch.causal(1, n, positions[-1:])
    return attention(attention.rotary.lookup(positions), hidden, (None, None), batch).numpy()


def assert_ranks_sum_to_tp1(folder: Path, attentions: list) -> None:
    hidden = paddle.to_tensor(np.random.default_rng(0).standard_normal((7, 64), dtype=np.float32))
    (whole,) = rank_attentions(folder, 1)
    parts = sum(attention_output(a, hidden) for a in attentions)
    np.testing.assert_allclose(parts, attention_output(whole, hidden), atol=1e-5)


def test_20_heads_over_8_ranks(tiny_20h):
    attentions = rank_attentions(tiny_20h, 8)
    shards = [a.qkv_proj.heads for a in attentions]
    assert [len(s.heads) for s in shards] == [3, 3, 3, 3, 2, 2, 2, 2]
    assert [s.heads.start for s in shards] == [0, 3, 6, 9, 12, 14, 16, 18]
    assert all(list(s.kv_heads) == sorted({h // 5 for h in s.heads}) and s.holds_output for s in shards)
    assert shards[1].kv_heads == range(2) and shards[1].kv_head_index == (0, 0, 1)  # heads 3, 4 | 5
    assert [a.num_kv_heads for a in attentions] == [1, 2, 1, 2, 1, 2, 1, 1]  # the KV cache's heads
    qkv = CheckpointReader(tiny_20h).get("ernie.layers.0.self_attn.qkv_proj.weight")  # q 160 | k 32 | v 32
    expected = np.concatenate([qkv[:, 24:48], qkv[:, 160:176], qkv[:, 192:208]], axis=1)
    np.testing.assert_array_equal(attentions[1].qkv_proj.weight.numpy(), expected)
    assert_ranks_sum_to_tp1(tiny_20h, attentions)


def test_4_heads_over_8_ranks_one_holds_each_output(tiny_paddle):
    attentions = rank_attentions(tiny_paddle, 8)
    assert [a.qkv_proj.heads.heads.start for a in attentions] == [0, 0, 1, 1, 2, 2, 3, 3]
    o_proj = CheckpointReader(tiny_paddle).get("ernie.layers.0.self_attn.o_proj.weight")  # [4 * 16, 64]
    for rank, attention in enumerate(attentions):
        head, held = rank // 2, attention.o_proj.weight.numpy()
        np.testing.assert_array_equal(held, o_proj[16 * head : 16 * (head + 1)] if rank % 2 == 0 else 0)
        assert attention.num_heads == attention.num_kv_heads == 1
    assert_ranks_sum_to_tp1(tiny_paddle, attentions)
