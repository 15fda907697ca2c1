"""tp=2 on this CPU: rank processes, gloo collectives, the same answers as tp=1."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import numpy as np
import pytest
from helpers import TEST_ENGINE
from server_utils import ROOT

from fdkit import LLM, SamplingParams

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


@pytest.fixture(scope="module")
def tp2(tiny_paddle):
    llm = LLM.from_config(
        [
            "model=ernie",
            f"model.path={tiny_paddle}",
            "tp=2",
            *[f"engine.{k}={v}" for k, v in TEST_ENGINE.items()],
        ]
    )
    yield llm
    pids = llm.engine.rank_pids
    llm.close()
    assert not any(is_alive(pid) for pid in pids)


def test_two_ranks_each_hold_half(tp1, tp2):
    assert len(tp2.engine.rank_pids) == 2 and all(is_alive(pid) for pid in tp2.engine.rank_pids)
    total = sum(int(p.size) for p in tp1.engine.runner.model.parameters())
    for rank in tp2.engine.rank_info:
        # norms are replicated, everything else split: a shade over half
        assert 0.5 * total <= rank["num_parameters"] <= 0.52 * total


def test_greedy_outputs_and_logprobs_match_tp1(tp1, tp2):
    expected = tp1.generate(PROMPTS, GREEDY, use_tqdm=False)
    got = tp2.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for a, b in zip(got, expected, strict=True):
        # fp32 all-reduce sums the partial products in another order: rounding only (see note)
        np.testing.assert_allclose([lp for lp, _ in a.logprobs], [lp for lp, _ in b.logprobs], atol=1e-4)
        np.testing.assert_allclose(
            [[v for _, v in top] for _, top in a.logprobs],
            [[v for _, v in top] for _, top in b.logprobs],
            atol=1e-4,
        )


def test_seeded_sampling_matches_tp1(tp1, tp2):
    sampled = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=7, ignore_eos=True)
    assert [o.token_ids for o in tp2.generate(PROMPTS, sampled, use_tqdm=False)] == [
        o.token_ids for o in tp1.generate(PROMPTS, sampled, use_tqdm=False)
    ]


def test_two_engines_side_by_side(tiny_paddle, tp2):
    """A second tp=2 engine on the same host picks its own ports."""
    other = LLM.from_config(
        [
            "model=ernie",
            f"model.path={tiny_paddle}",
            "tp=2",
            *[f"engine.{k}={v}" for k, v in TEST_ENGINE.items()],
        ]
    )
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
