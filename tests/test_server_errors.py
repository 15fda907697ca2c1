"""Every bad request gets OpenAI's error envelope with the right status, and the server goes on."""

from __future__ import annotations

import threading

import httpx
import pytest

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


def assert_still_serves(base_url: str, headers: dict | None = None):
    response = httpx.post(base_url + "/v1/chat/completions", json=GOOD_CHAT, headers=headers, timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None


BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**GOOD_CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {**GOOD_CHAT, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {**GOOD_CHAT, "max_tokens": -3}, "max_tokens"),
    ("/v1/chat/completions", {**GOOD_CHAT, "stream_options": {"include_usage": True}}, None),
    ("/v1/chat/completions", {**GOOD_CHAT, "stop": ["s"] * 17}, "stop"),
    ("/v1/chat/completions", {**GOOD_CHAT, "stop": ["x" * 300]}, "stop"),
    ("/v1/chat/completions", {**GOOD_CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**GOOD_CHAT, "n": 0}, "n"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_validation_errors_are_400(server, path, body, param):
    assert_error(httpx.post(server.base_url + path, json=body), 400, param=param)
    assert_still_serves(server.base_url)


def test_malformed_json_is_400(server):
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, code="invalid_json")
    assert_still_serves(server.base_url)


def test_context_length_exceeded(server):
    body = {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 2}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body)
    assert_error(response, 400, code="context_length_exceeded")
    assert "Input text is too long" in response.json()["error"]["message"]
    body = {"prompt": "hi", "max_tokens": 2, "min_tokens": 600}
    assert_error(httpx.post(server.base_url + "/v1/completions", json=body), 400)
    assert_still_serves(server.base_url)


def test_unknown_route_is_404(server):
    assert_error(httpx.get(server.base_url + "/v1/nothing"), 404, code="not_found")
    response = httpx.get(server.base_url + "/v1/chat/completions")
    assert_error(response, 405)
    assert response.headers["allow"] == "POST"
    assert_still_serves(server.base_url)


@pytest.fixture(scope="module")
def strict_server(tiny_paddle, tmp_path_factory):
    """API keys (FDKIT_API_KEY, through the config), strict model names, small limits, a reasoning parser."""
    from server_utils import launch

    srv = launch(
        tiny_paddle,
        tmp_path_factory.mktemp("strict") / "server.log",
        "server.strict_model_name=true",
        "server.max_request_bytes=2000",
        "server.max_concurrency=1",
        "server.reasoning_parser=ernie-45-vl",
        "server.public_paths=[/version]",
        env={"FDKIT_API_KEY": "key-a, key-b,key-c"},
    )
    yield srv
    srv.stop()


AUTH = {"Authorization": "Bearer key-a"}


PROTECTED = ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models", "/docs/oauth2-redirect"]


def test_api_keys(strict_server):
    url = strict_server.base_url + "/v1/chat/completions"
    assert_error(httpx.post(url, json=GOOD_CHAT), 401, code="invalid_api_key")
    assert_error(httpx.post(url, json=GOOD_CHAT, headers={"Authorization": "Bearer wrong"}), 401)
    for key in ("key-a", "key-b", "key-c"):
        assert_still_serves(strict_server.base_url, {"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize("path", PROTECTED + ["/v1/completions", "/v1/nothing"])
def test_api_keys_cover_every_route(strict_server, path):
    """Docs, schema, metrics and models too; unknown paths get 401, not a map of what exists."""
    response = httpx.get(strict_server.base_url + path)
    assert_error(response, 401, code="invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    if path in PROTECTED:
        assert httpx.get(strict_server.base_url + path, headers=AUTH).status_code == 200


def test_health_and_public_paths_need_no_key(strict_server):
    assert httpx.get(strict_server.base_url + "/health").status_code == 200  # probes
    assert httpx.get(strict_server.base_url + "/version").json()["version"]  # server.public_paths


def test_strict_model_name_is_404(strict_server):
    body = {**GOOD_CHAT, "model": "gpt-4"}
    response = httpx.post(strict_server.base_url + "/v1/chat/completions", json=body, headers=AUTH)
    assert_error(response, 404, code="model_not_found", param="model")
    body["model"] = "ernie-tiny"
    assert (
        httpx.post(strict_server.base_url + "/v1/chat/completions", json=body, headers=AUTH).status_code
        == 200
    )


def test_body_over_the_limit_is_413(strict_server):
    body = {"messages": [{"role": "user", "content": "x" * 3000}]}
    response = httpx.post(strict_server.base_url + "/v1/chat/completions", json=body, headers=AUTH)
    assert_error(response, 413)
    assert_still_serves(strict_server.base_url, AUTH)


def test_too_many_concurrent_requests_is_429(strict_server):
    body = {"prompt": "hi", "max_tokens": 400, "stream": True, "ignore_eos": True}
    started = threading.Event()

    def long_stream():
        with httpx.stream(
            "POST", strict_server.base_url + "/v1/completions", json=body, headers=AUTH, timeout=60
        ) as response:
            for _ in response.iter_lines():
                started.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(30)
    response = httpx.post(strict_server.base_url + "/v1/chat/completions", json=GOOD_CHAT, headers=AUTH)
    assert_error(response, 429, code="too_many_requests")
    thread.join(60)
    assert_still_serves(strict_server.base_url, AUTH)


def test_reasoning_budget_splits_reasoning_from_content(strict_server):
    """The engine ends reasoning after reasoning_max_tokens; the parser puts the rest in content."""
    body = {
        "messages": [{"role": "user", "content": "think"}],
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "reasoning_max_tokens": 4,
        "return_token_ids": True,
    }
    response = httpx.post(strict_server.base_url + "/v1/chat/completions", json=body, headers=AUTH).json()
    message, usage = response["choices"][0]["message"], response["usage"]
    assert "</think>" not in message["content"] and "</think>" not in message["reasoning_content"]
    assert message["reasoning_content"] == message["reasoning"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 4
    assert message["completion_token_ids"][4] != message["completion_token_ids"][3]
    streamed = httpx.post(
        strict_server.base_url + "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH
    ).text
    chunks = [
        __import__("json").loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")
    ]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    off = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    plain = httpx.post(strict_server.base_url + "/v1/chat/completions", json=off, headers=AUTH).json()
    assert plain["choices"][0]["message"]["reasoning_content"] is None  # present, null (FastDeploy)
    assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_dead_engine_is_503(tiny_paddle):
    """An engine whose loop failed: /health and requests answer 503 (in-process, through ASGI)."""
    import asyncio

    from helpers import TEST_ENGINE

    from fdkit import LLM, load_config
    from fdkit.engine.async_engine import AsyncLLM
    from fdkit.serving.openai_app import build_app

    cfg = load_config(["model=ernie", f"model.path={tiny_paddle}"])
    engine = AsyncLLM(LLM(tiny_paddle, **TEST_ENGINE))
    app = build_app(engine, cfg)
    engine.error = RuntimeError("simulated crash")

    async def calls():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fdkit") as client:
            return await client.get("/health"), await client.post("/v1/chat/completions", json=GOOD_CHAT)

    try:
        health, chat = asyncio.run(calls())
        assert_error(health, 503)
        assert_error(chat, 503, code="engine_unavailable")
    finally:
        engine.shutdown()
