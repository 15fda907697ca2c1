"""The OpenAI-compatible server, live on loopback, through the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx
import pytest

MESSAGES = [{"role": "user", "content": "Hello! 你好"}]
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_service_endpoints(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/version").json()["version"]
    models = httpx.get(server.base_url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "ernie-tiny"
    assert models["data"][0]["max_model_len"] == 512
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "fdkit:num_requests_running",
        "fdkit:num_requests_waiting",
        "fdkit:kv_cache_usage_perc",
        "fdkit:time_to_first_token_seconds",
        "fdkit:time_per_output_token_seconds",
        "fdkit:e2e_request_latency_seconds",
        "fdkit:prompt_tokens_total",
        "fdkit:generation_tokens_total",
    ):
        assert name in text


def test_chat_non_stream_and_usage(client, tiny_paddle):
    from fdkit.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_paddle)
    num_prompt_tokens = len(tokenizer.encode(tokenizer.apply_chat_template(MESSAGES)))
    response = client.chat.completions.create(model="ernie-tiny", messages=MESSAGES, **GREEDY)
    choice = response.choices[0]
    assert response.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and choice.message.content
    usage = response.usage
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12
    assert usage.prompt_tokens == num_prompt_tokens
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_stream_joins_to_the_non_streamed_text(client):
    full = client.chat.completions.create(messages=MESSAGES, model="x", **GREEDY).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=MESSAGES, model="x", stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == ["length"] and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert all(c.usage is None for c in chunks)


def test_include_usage_and_continuous_usage_stats(client):
    chunks = list(
        client.chat.completions.create(
            messages=MESSAGES, model="x", stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1].usage
    assert last.total_tokens == last.prompt_tokens + last.completion_tokens
    extra = {"ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = list(
        client.chat.completions.create(
            messages=MESSAGES, model="x", stream=True, temperature=0, max_tokens=12, extra_body=extra
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].delta.content]
    assert counts == sorted(counts) and counts[-1] == 12 and all(c.usage for c in chunks)


def test_completions_stream_and_non_stream(client):
    full = client.completions.create(model="x", prompt="Once upon a time", **GREEDY)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="x", prompt="Once upon a time", stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    batch = client.completions.create(model="x", prompt=["one", "two"], n=2, **GREEDY)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]


def test_max_tokens_one_gives_length(client):
    response = client.chat.completions.create(messages=MESSAGES, model="x", max_tokens=1)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 1


def test_max_tokens_default_is_the_rest_of_the_context(client):
    response = client.completions.create(
        model="x", prompt="hi", temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.usage.total_tokens == 512


def test_min_tokens_holds(client):
    first = client.completions.create(
        model="x",
        prompt="Once upon a time",
        temperature=0,
        max_tokens=1,
        extra_body={"return_token_ids": True},
    )
    stop_id = first.choices[0].model_extra["completion_token_ids"][0]
    stopped = client.completions.create(
        model="x",
        prompt="Once upon a time",
        temperature=0,
        max_tokens=20,
        extra_body={"stop_token_ids": [stop_id]},
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    held = client.chat.completions.create(
        messages=MESSAGES,
        model="x",
        temperature=0,
        max_tokens=20,
        extra_body={"min_tokens": 5, "stop_token_ids": [stop_id]},
    )
    assert held.usage.completion_tokens >= 5


def test_stop_strings_cut(client):
    text = client.completions.create(model="x", prompt="Once upon a time", **GREEDY).choices[0].text
    stop = text[4:6]
    out = client.completions.create(model="x", prompt="Once upon a time", stop=[stop], **GREEDY).choices[0]
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)]
    kept = client.completions.create(
        model="x",
        prompt="Once upon a time",
        stop=[stop],
        temperature=0,
        max_tokens=12,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )
    assert kept.choices[0].text == text[: text.find(stop) + len(stop)]


def test_seed_reproducibility(client):
    kwargs = dict(model="x", messages=MESSAGES, temperature=1.0, top_p=0.95, max_tokens=16, seed=42)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first
    n2 = client.chat.completions.create(**{**kwargs, "n": 2})
    assert len(n2.choices) == 2 and n2.choices[0].message.content == first


def test_logprobs(client):
    response = client.chat.completions.create(
        messages=MESSAGES, model="x", temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)  # greedy


def test_return_token_ids_and_unknown_fields(client):
    response = client.chat.completions.create(
        messages=MESSAGES,
        model="x",
        max_tokens=3,
        user="u1",
        extra_body={"return_token_ids": True, "some_future_field": 1, "chat_template_kwargs": {"x": 1}},
    )
    message = response.choices[0].message.model_extra
    assert len(message["completion_token_ids"]) == 3 and message["prompt_token_ids"]


def test_sixteen_concurrent_streams_finish(client, server):
    def one(i: int) -> str | None:
        chunks = list(
            client.chat.completions.create(
                messages=[{"role": "user", "content": f"request {i}"}], model="x", stream=True, max_tokens=20
            )
        )
        return chunks[-1].choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(one, range(16)))
    assert all(r in ("stop", "length") for r in reasons)
    assert metric(server.base_url, "fdkit:kv_cache_usage_perc") == 0.0


def test_disconnect_mid_stream_frees_blocks(server):
    aborted = metric(server.base_url, 'fdkit:request_success_total{finish_reason="abort"}')
    body = {"prompt": "hi", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith('data: {"id"')
    deadline = time.time() + 10
    while metric(server.base_url, "fdkit:num_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    assert metric(server.base_url, "fdkit:num_requests_running") == 0
    assert metric(server.base_url, "fdkit:kv_cache_usage_perc") == 0.0
    assert metric(server.base_url, 'fdkit:request_success_total{finish_reason="abort"}') == aborted + 1


def test_stream_ends_with_done(server):
    body = {"prompt": "hi", "max_tokens": 3, "stream": True}
    lines = [
        line for line in httpx.post(server.base_url + "/v1/completions", json=body).text.splitlines() if line
    ]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in lines[:-1])
