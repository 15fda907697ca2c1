"""The Thinking model's config: its own chat template opens <think>, the ernie-x1 parser splits the
reasoning from the answer, and thinking stays on whatever the request says (FastDeploy's rule)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from helpers import TEST_ENGINE
from server_utils import launch_config

from fdkit import LLM, SamplingParams, load_config

# The Thinking model's conversation format (ERNIEKit's template, as reference_moe_facts.md has it).
THINKING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]
# A tiny Ernie4_5_MoeForCausalLM in the -PT layout (the Thinking model's), written by transformers.
TINY_MOE = Path(__file__).parent / "data" / "moe_reference" / "tiny_moe_pt"


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory):
    """A tiny MoE checkpoint with the Thinking model's template, saved as transformers saves one now."""
    folder = tmp_path_factory.mktemp("thinking") / "ERNIE-4.5-21B-A3B-Thinking"
    shutil.copytree(TINY_MOE, folder)
    (folder / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    return folder


def test_config_names_the_published_model():
    model = load_config(["model=ernie_21b_a3b_thinking"]).model
    assert model.name == "ERNIE-4.5-21B-A3B-Thinking" and model.path.endswith("/ERNIE-4.5-21B-A3B-Thinking")
    assert model.reasoning_parser == "ernie-x1" and model.always_thinks


def test_the_checkpoint_template_opens_thinking(thinking_checkpoint):
    with LLM(thinking_checkpoint, **TEST_ENGINE) as llm:
        out = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert out.prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"


@pytest.fixture(scope="module")
def thinking_server(thinking_checkpoint, tmp_path_factory):
    srv = launch_config(
        tmp_path_factory.mktemp("thinking_server") / "server.log",
        "model=ernie_21b_a3b_thinking",
        f"model.path={thinking_checkpoint}",
        "engine.num_kv_blocks=64",
        "engine.block_size=16",
        "playground.enabled=false",
    )
    yield srv
    srv.stop()


def chat(server, stream: bool, **fields) -> dict | list[dict]:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **fields}
    if not stream:
        return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).json()
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def joined(chunks: list[dict], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_served_reasoning_is_apart_and_thinking_stays_on(thinking_server, enable_thinking):
    models = httpx.get(thinking_server.base_url + "/v1/models").json()
    assert models["data"][0]["id"] == "ERNIE-4.5-21B-A3B-Thinking"
    fields = {"reasoning_max_tokens": 4, "chat_template_kwargs": {"enable_thinking": enable_thinking}}
    whole = chat(thinking_server, False, **fields)
    message = whole["choices"][0]["message"]
    # The budget ends the reasoning after 4 tokens with </think>; what follows is the answer.
    assert message["reasoning_content"] and message["content"]
    assert "</think>" not in message["reasoning_content"] + message["content"]
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    chunks = chat(thinking_server, True, **fields)
    assert joined(chunks, "reasoning_content") == message["reasoning_content"]
    assert joined(chunks, "content") == message["content"]
