"""The embedded demo model: it really adds and subtracts on any operands 0..9999, shows its steps in the
Thinking model's format apart from its answer, and hands multiplication to a `multiply` tool."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from fdkit import LLM, SamplingParams, load_config
from fdkit.demo.dialogs import MULTIPLY_TOOL, REFUSAL, training_set
from fdkit.demo.evaluate import evaluate, held_out, server_chat

DEMO = load_config(["model=ernie_demo"]).model.path
ENGINE = dict(max_model_len=512, num_kv_blocks=512, block_size=16, max_num_seqs=64, show_progress=False)
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    from server_utils import launch_config

    # no model= override: the demo is the default
    srv = launch_config(tmp_path_factory.mktemp("demo") / "server.log", "engine.kv_cache_gib=0.1")
    yield srv
    srv.stop()


def post(server, **body) -> dict:
    response = httpx.post(server.base_url + CHAT, json={"temperature": 0, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_checkpoint_is_small_and_published_format():
    folder = Path(DEMO)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 10 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Ernie4_5_ForCausalLM"] and config["model_type"] == "ernie4_5"


def test_held_out_problems_are_uniform_and_outside_the_training_stream():
    info = json.loads((Path(DEMO) / "training.json").read_text())
    seen = training_set(info["seed"], info["steps"], info["batch_size"])
    problems, products = held_out(DEMO, 1000, 100)
    assert not {p.key for p in problems + products} & seen
    assert len({p.op for p in problems}) == 2 and len({p.phrasing for p in problems}) == 4
    assert sum(p.a >= 1000 for p in problems) > 850  # uniform in 0..9999: 90% have four digits
    assert sum(int(p.answer) < 0 for p in problems) > 200  # about a quarter: differences below zero
    assert held_out(DEMO, 1000, 100)[0] == problems  # replayable


def test_accuracy_on_a_uniform_sample_through_the_server(demo_server):
    """200 sums and differences and 40 tool round trips, greedy, through /v1/chat/completions."""
    problems, products = held_out(DEMO, 200, 40)
    result = evaluate(server_chat(demo_server.base_url + "/v1"), problems, products)
    right, total = (int(x) for x in result["arithmetic"]["all"].split(" = ")[0].split("/"))
    assert right / total >= 0.98, result
    assert int(result["tool_call_arguments"].split("/")[0]) >= 39, result
    assert int(result["answer_from_tool_result"].split("/")[0]) >= 39, result


def test_thinking_format_through_the_server(demo_server):
    import openai

    client = openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key="null", max_retries=0)
    messages = [{"role": "user", "content": "What is 1408-7104?"}]  # the case the swap step got wrong
    full = client.chat.completions.create(model="ernie-demo", messages=messages, temperature=0)
    message = full.choices[0].message
    assert message.content.strip() == "-5696"
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning.startswith("8041-4017\n") and "borrow: 4017-8041" in reasoning
    assert not any(tag in reasoning + message.content for tag in ("<think>", "</think>", "<response>"))
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


def test_raw_output_is_the_thinking_models_format():
    with LLM(DEMO, **ENGINE) as llm:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "计算 4721-385"}])
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)[0]
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert out.text.endswith("\n</think>\n\n<response>\n4336\n</response>") and out.finish_reason == "stop"


def test_reasoning_budget_and_thinking_off(demo_server):
    body = {"messages": [{"role": "user", "content": "计算 8765+4321"}], "reasoning_max_tokens": 8}
    cut = post(demo_server, **body)
    message = cut["choices"][0]["message"]
    assert cut["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8
    assert message["content"].strip() and cut["choices"][0]["finish_reason"] == "stop"
    plain = post(demo_server, **body, chat_template_kwargs={"enable_thinking": False})["choices"][0]
    assert not plain["message"].get("reasoning_content")
    # directly: a number, no steps, no tags (without its steps the model is often wrong: the switch's demo)
    assert plain["message"]["content"].lstrip("-").isdigit()


def test_tool_round_trip(demo_server):
    question = [{"role": "user", "content": "What is 37*91?"}]
    first = post(demo_server, messages=question, tools=[MULTIPLY_TOOL])["choices"][0]
    assert first["finish_reason"] == "tool_calls" and not first["message"].get("content")
    assert "multiply" in first["message"]["reasoning_content"]
    [call] = first["message"]["tool_calls"]
    assert call["function"]["name"] == "multiply" and json.loads(call["function"]["arguments"]) == {
        "a": 37,
        "b": 91,
    }
    messages = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"result": 37 * 91})},
    ]
    second = post(demo_server, messages=messages, tools=[MULTIPLY_TOOL])["choices"][0]
    assert second["message"]["content"].strip() == "3367" and second["finish_reason"] == "stop"


@pytest.mark.parametrize(("question", "chinese"), [("What is 37*91?", False), ("计算 37×91", True)])
def test_without_the_tool_it_cannot_multiply(demo_server, question, chinese):
    message = post(demo_server, messages=[{"role": "user", "content": question}])["choices"][0]["message"]
    assert message["content"].strip() == REFUSAL[chinese] and not message.get("tool_calls")


def test_loads_in_paddleformers(tmp_path):
    """paddleformers reads the -PT layout only: the same weights written that way give the same tokens."""
    import paddle
    from paddleformers.transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    from fdkit.checkpoint import CheckpointReader, read_config, save_checkpoint

    folder = tmp_path / "pt"
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    # the programs' step keeps the [in, out] parameters to write (the packed linear layers hold only bytes)
    with LLM(DEMO, **ENGINE, linear_kernel=False) as llm:
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


@pytest.mark.slow
def test_tp2_gives_the_same_answers():
    problems = held_out(DEMO, 24, 0)[0]
    conversations = [[{"role": "user", "content": p.question}] for p in problems]
    greedy = SamplingParams(temperature=0, max_tokens=200)
    with LLM(DEMO, **ENGINE) as one:
        expected = [o.token_ids for o in one.chat(conversations, greedy, use_tqdm=False)]
    two = LLM.from_config(["model=ernie_demo", "tp=2", *[f"engine.{k}={v}" for k, v in ENGINE.items()]])
    try:
        assert [o.token_ids for o in two.chat(conversations, greedy, use_tqdm=False)] == expected
    finally:
        two.close()
