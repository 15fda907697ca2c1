"""The MoE configs as a user launches them: `python launch.py model=ernie_21b_a3b tp=8 model.path=...`
and `LLM.from_config([...])`, on the tiny MoE checkpoint that transformers wrote (4 heads over 8 ranks)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from server_utils import launch_config

from fdkit import LLM, SamplingParams

REFERENCE = Path(__file__).parent / "data" / "moe_reference"
TINY_MOE = REFERENCE / "tiny_moe_pt"
SMALL_ENGINE = ["engine.num_kv_blocks=64", "engine.block_size=16", "engine.max_model_len=512"]
NUM_TOKENS = 12


@pytest.fixture(scope="module")
def reference() -> tuple[list[int], list[int]]:
    data = np.load(REFERENCE / "reference.npz")
    return data["prompt_1"].tolist(), data["greedy_1"][:NUM_TOKENS].tolist()


@pytest.fixture(scope="module")
def tp8_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("moe_tp8") / "server.log"
    srv = launch_config(log, "model=ernie_21b_a3b", "tp=8", f"model.path={TINY_MOE}", *SMALL_ENGINE)
    yield srv
    srv.stop()


def test_launch_with_tp8_serves_the_reference_tokens(tp8_server, reference):
    prompt, expected = reference
    models = httpx.get(tp8_server.base_url + "/v1/models").json()
    assert models["data"][0]["id"] == "ERNIE-4.5-21B-A3B-Paddle"
    body = {"prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True}
    response = httpx.post(tp8_server.base_url + "/v1/completions", json={**body, "return_token_ids": True})
    assert response.json()["choices"][0]["completion_token_ids"] == expected


def test_from_config_gives_the_same_tokens(reference):
    """LLM.from_config on the MoE config (model=ernie_21b_a3b) at tp=1 gives the reference tokens; tp=8
    is test_moe.py's test_more_ranks_than_heads_match_the_reference."""
    prompt, expected = reference
    overrides = ["model=ernie_21b_a3b", f"model.path={TINY_MOE}", *SMALL_ENGINE]
    with LLM.from_config([*overrides, "engine.show_progress=false"]) as llm:
        params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
        assert llm.generate(prompt, params, use_tqdm=False)[0].token_ids == expected
