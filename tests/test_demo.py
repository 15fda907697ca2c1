"""The embedded demo model: it really adds and subtracts, and shows its steps apart from its answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fdkit import LLM, SamplingParams, load_config
from fdkit.demo.arithmetic import held_out_problems
from fdkit.demo.train import EVAL_SEED, answer_of, training_set

DEMO = load_config(["model=ernie_demo"]).model.path
ENGINE = dict(max_model_len=512, num_kv_blocks=512, block_size=16, max_num_seqs=64, show_progress=False)
GREEDY = SamplingParams(temperature=0, max_tokens=160)


@pytest.fixture(scope="module")
def demo():
    with LLM(DEMO, **ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def held_out():
    info = json.loads((Path(DEMO) / "training.json").read_text())
    seen = training_set(info["seed"], info["steps"], info["batch_size"])
    problems = held_out_problems(200, EVAL_SEED, seen)
    assert not {(p.a, p.op, p.b) for p in problems} & seen
    return problems


def chat(llm, problems, thinking: bool):
    messages = [[{"role": "user", "content": p.question}] for p in problems]
    return llm.chat(messages, GREEDY, enable_thinking=thinking, use_tqdm=False)


def test_checkpoint_is_small_and_published_format():
    folder = Path(DEMO)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 10 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Ernie4_5_ForCausalLM"] and config["model_type"] == "ernie4_5"


def test_accuracy_with_thinking_on(demo, held_out):
    outputs = chat(demo, held_out, thinking=True)
    correct = [answer_of(o.text) == p.answer for o, p in zip(outputs, held_out, strict=True)]
    assert sum(correct) / len(correct) >= 0.95, [
        (p.question, o.text) for o, p, c in zip(outputs, held_out, correct, strict=True) if not c
    ][:5]
    assert all("</think>" in o.text for o in outputs)


def test_thinking_off_answers_directly(demo, held_out):
    outputs = chat(demo, held_out[:20], thinking=False)
    assert all("</think>" not in o.text and o.finish_reason == "stop" for o in outputs)
    assert all(o.text.strip().lstrip("-").isdigit() for o in outputs)


def test_loads_in_paddleformers(tmp_path):
    """paddleformers reads the -PT layout only: the same weights written that way give the same tokens."""
    import paddle
    from paddleformers.transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    from fdkit.checkpoint import CheckpointReader, read_config, save_checkpoint

    folder = tmp_path / "pt"
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    with LLM(DEMO, **ENGINE) as llm:
        model, module = llm.engine.runner.model, llm.engine.runner.module
        state = {name: param.numpy() for name, param in model.named_parameters()}
        save_checkpoint(folder, state, module, read_config(DEMO), "pt")
        ids = llm.tokenizer.encode(
            llm.tokenizer.apply_chat_template([{"role": "user", "content": "计算 47+85"}])
        )
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40, logprobs=1), use_tqdm=False)[0]
    config = model.config
    assert CheckpointReader(folder).shape("lm_head.weight") == (config.vocab_size, config.hidden_size)
    pf_config = Ernie4_5Config.from_pretrained(str(folder))
    pf_config.fuse_rms_norm = False
    reference = Ernie4_5ForCausalLM.from_pretrained(str(folder), config=pf_config, dtype="float32")
    reference.eval()
    with paddle.no_grad():
        generated, _ = reference.generate(
            input_ids=paddle.to_tensor([ids]),
            max_new_tokens=len(out.token_ids),
            decode_strategy="greedy_search",
            use_cache=True,
        )
    assert generated[0].tolist()[: len(out.token_ids)] == out.token_ids


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    from server_utils import launch_config

    # no model= override: the demo is the default
    srv = launch_config(tmp_path_factory.mktemp("demo") / "server.log", "engine.kv_cache_gib=0.05")
    yield srv
    srv.stop()


def test_default_server_splits_reasoning_and_answer(demo_server):
    import openai

    client = openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key="null", max_retries=0)
    messages = [{"role": "user", "content": "What is 4721-385?"}]
    full = client.chat.completions.create(model="ernie-demo", messages=messages, temperature=0)
    message = full.choices[0].message
    assert message.content.strip() == "4336"
    reasoning = message.model_extra["reasoning_content"]
    assert "1-5-0=6 1" in reasoning and "</think>" not in reasoning + message.content
    assert full.usage.completion_tokens_details.reasoning_tokens > 10
    chunks = list(
        client.chat.completions.create(model="ernie-demo", messages=messages, temperature=0, stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == message.content
    answering = [i for i, d in enumerate(deltas) if d.content]
    thinking = [i for i, d in enumerate(deltas) if (d.model_extra or {}).get("reasoning_content")]
    assert max(thinking) < min(answering)  # the reasoning streams first, then the answer


def test_reasoning_budget_and_thinking_off(demo_server):
    import httpx

    body = {
        "messages": [{"role": "user", "content": "计算 8765+4321"}],
        "temperature": 0,
        "reasoning_max_tokens": 8,
    }
    cut = httpx.post(demo_server.base_url + "/v1/chat/completions", json=body, timeout=60).json()
    message = cut["choices"][0]["message"]
    assert cut["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8
    assert message["content"].strip() and cut["choices"][0]["finish_reason"] == "stop"
    off = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    plain = httpx.post(demo_server.base_url + "/v1/chat/completions", json=off, timeout=60).json()
    assert not plain["choices"][0]["message"].get("reasoning_content")
    assert plain["choices"][0]["message"]["content"].strip().lstrip("-").isdigit()


@pytest.mark.slow
def test_tp2_gives_the_same_answers(held_out):
    problems = held_out[:24]
    with LLM(DEMO, **ENGINE) as one:
        expected = [o.token_ids for o in chat(one, problems, thinking=True)]
    two = LLM.from_config(["model=ernie_demo", "tp=2", *[f"engine.{k}={v}" for k, v in ENGINE.items()]])
    try:
        assert [o.token_ids for o in chat(two, problems, thinking=True)] == expected
    finally:
        two.close()
