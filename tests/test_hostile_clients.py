"""Nothing a client sends can stop or break the server: bad bodies get a 4xx in OpenAI's envelope (never a
traceback), clients that vanish mid-stream leave nothing behind, duplicate ids are refused, a dead engine
is reported without its insides, and SIGTERM drains instead of cutting streams off."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time

import httpx
import pytest

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/work/|/tmp/|/home/|site-packages")


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert not LEAKS.search(error["message"]), error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_still_serves(base_url: str) -> None:
    assert httpx.get(base_url + "/health", timeout=10).status_code == 200
    response = httpx.post(base_url + CHAT, json=GOOD_CHAT, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"]


def sse_payloads(lines: list[str]) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def hostile_server(tiny_paddle, tmp_path_factory):
    from server_utils import launch

    log = tmp_path_factory.mktemp("hostile") / "server.log"
    srv = launch(tiny_paddle, log, "server.max_prompts_per_request=8")
    yield srv
    srv.stop()


# -- bad bodies -------------------------------------------------------------------------------------

SURROGATE_CHAT = b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]'
SURROGATE_PROMPT = b'{"prompt": "\\ud800 hi"'
DEEP = (
    b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001
)
DEEP_LIST = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
MESSAGES = GOOD_CHAT["messages"]

# (path, body: a dict, or raw bytes, 400's param or None)
BAD_BODIES = {
    # the findings
    "text part not a string": (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": ["hi"]}]}]},
        "messages.0.content.0.text",
    ),
    "nested 5000 deep, chat": (CHAT, DEEP, None),
    "nested 5000 deep, completions": (COMPLETIONS, DEEP_LIST, None),
    "nested 100 deep": (CHAT, b'{"messages": [], "x": ' + b"[" * 100 + b"]" * 100 + b"}", None),
    "lone surrogate, chat": (CHAT, SURROGATE_CHAT + b"}", "messages.0.content"),
    "lone surrogate, chat stream": (CHAT, SURROGATE_CHAT + b', "stream": true}', "messages.0.content"),
    "lone surrogate, completions": (COMPLETIONS, SURROGATE_PROMPT + b"}", "prompt"),
    "lone surrogate, completions stream": (COMPLETIONS, SURROGATE_PROMPT + b', "stream": true}', "prompt"),
    "lone surrogate in a stop string": (COMPLETIONS, b'{"prompt": "hi", "stop": ["\\udfff"]}', "stop.0"),
    "lone surrogate in a key": (COMPLETIONS, b'{"prompt": "hi", "\\ud800": 1}', None),
    "string for bool": (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, "stream"),
    "bool for int (top_logprobs)": (
        CHAT,
        {"messages": MESSAGES, "logprobs": True, "top_logprobs": False},
        "top_logprobs",
    ),
    "bool for token id": (COMPLETIONS, {"prompt": [[False]]}, "prompt.0.0"),
    "bool for token id, flat": (COMPLETIONS, {"prompt": [True, 5]}, "prompt.0"),
    "bool for max_tokens": (CHAT, {**GOOD_CHAT, "max_tokens": True}, "max_tokens"),
    "string for number": (CHAT, {**GOOD_CHAT, "temperature": "0.5"}, "temperature"),
    "string for int": (CHAT, {**GOOD_CHAT, "n": "2"}, "n"),
    "float for int": (CHAT, {**GOOD_CHAT, "n": 1.5}, "n"),
    "string for logprobs": (CHAT, {**GOOD_CHAT, "logprobs": "true"}, "logprobs"),
    # wrong shapes and values
    "messages not a list": (CHAT, {"messages": "hello"}, "messages"),
    "no messages": (CHAT, {"messages": []}, "messages"),
    "null messages": (CHAT, {"messages": None}, "messages"),
    "unknown role": (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    "no role": (CHAT, {"messages": [{"content": "x"}]}, "messages.0.role"),
    "content an object": (CHAT, {"messages": [{"role": "user", "content": {"a": 1}}]}, "messages.0.content"),
    "image part": (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages.0.content.0.type",
    ),
    "huge n": (CHAT, {**GOOD_CHAT, "n": 100000}, "n"),
    "n zero": (CHAT, {**GOOD_CHAT, "n": 0}, "n"),
    "negative max_tokens": (COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    "max_tokens beyond int32": (COMPLETIONS, {"prompt": "hi", "max_tokens": 2**70}, "max_tokens"),
    "top_k beyond int32": (COMPLETIONS, {"prompt": "hi", "top_k": 77115100727174067480690688}, "top_k"),
    "top_k below -1": (COMPLETIONS, {"prompt": "hi", "top_k": -2}, "top_k"),
    "top_p over 1": (CHAT, {**GOOD_CHAT, "top_p": 1.5}, "top_p"),
    "temperature NaN": (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    "repetition_penalty infinite": (
        COMPLETIONS,
        b'{"prompt": "hi", "repetition_penalty": 1e999}',
        "repetition_penalty",
    ),
    "negative seed": (CHAT, {**GOOD_CHAT, "seed": -1}, "seed"),
    "seed beyond int64": (CHAT, {**GOOD_CHAT, "seed": 2**64}, "seed"),
    "stop a number": (CHAT, {**GOOD_CHAT, "stop": 5}, "stop"),
    "stop numbers": (CHAT, {**GOOD_CHAT, "stop": [1, 2]}, "stop.0"),
    "too many stop strings": (CHAT, {**GOOD_CHAT, "stop": ["s"] * 17}, "stop"),
    "stop string too long": (CHAT, {**GOOD_CHAT, "stop": ["x" * 300]}, "stop"),
    "negative stop token id": (CHAT, {**GOOD_CHAT, "stop_token_ids": [-1]}, "stop_token_ids.0"),
    "top_logprobs over 20": (CHAT, {**GOOD_CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top_logprobs without logprobs": (CHAT, {**GOOD_CHAT, "top_logprobs": 3}, None),
    "completion logprobs over 20": (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, "logprobs"),
    "min_tokens over max_tokens": (COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, None),
    "stream_options without stream": (CHAT, {**GOOD_CHAT, "stream_options": {"include_usage": True}}, None),
    "stream_options of strings": (
        CHAT,
        {**GOOD_CHAT, "stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    "metadata of strings": (CHAT, {**GOOD_CHAT, "metadata": {"min_tokens": "5"}}, "metadata.min_tokens"),
    "enable_thinking a string": (
        CHAT,
        {**GOOD_CHAT, "chat_template_kwargs": {"enable_thinking": "no"}},
        "chat_template_kwargs.enable_thinking",
    ),
    "template kwargs that clash": (
        CHAT,
        {**GOOD_CHAT, "chat_template_kwargs": {"add_generation_prompt": 1}},
        "messages",
    ),
    "empty request_id": (CHAT, {**GOOD_CHAT, "request_id": ""}, "request_id"),
    "numeric request_id": (CHAT, {**GOOD_CHAT, "request_id": 7}, "request_id"),
    "empty prompt": (COMPLETIONS, {"prompt": ""}, "prompt"),
    "empty token list": (COMPLETIONS, {"prompt": [[]]}, "prompt.0"),
    "token id out of range": (COMPLETIONS, {"prompt": [10**12]}, None),
    "negative token id": (COMPLETIONS, {"prompt": [-1]}, None),
    "too many prompts": (COMPLETIONS, {"prompt": ["a"] * 9, "max_tokens": 1}, "prompt"),
    "no prompt": (COMPLETIONS, {"max_tokens": 2}, "prompt"),
    "context too long": (CHAT, {"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
    # not a request at all
    "a list": (CHAT, b"[1, 2]", None),
    "a string": (CHAT, b'"hi"', None),
    "null": (COMPLETIONS, b"null", None),
    "empty body": (COMPLETIONS, b"", None),
    "not UTF-8": (CHAT, b'{"messages": "\xff\xfe"}', None),
    "truncated JSON": (CHAT, b'{"messages": [', None),
}


@pytest.mark.parametrize(("path", "body", "param"), list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_bad_body_is_400_in_the_envelope(hostile_server, path, body, param):
    url = hostile_server.base_url + path
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        response = httpx.post(url, json=body, timeout=60)
    assert_error(response, 400, param)
    assert_still_serves(hostile_server.base_url)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("TRACE", "/health", "GET"),
        ("POST", "/health", "GET"),
        ("GET", CHAT, "POST"),
        ("PUT", "/metrics", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(hostile_server, method, path, allow):
    response = httpx.request(method, hostile_server.base_url + path, timeout=10)
    assert_error(response, 405)
    assert response.headers["allow"] == allow


def test_unknown_route_is_404(hostile_server):
    assert_error(httpx.get(hostile_server.base_url + "/v1/nothing"), 404)


def test_body_over_the_limit_without_content_length_is_413(hostile_server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * 2**20

    response = httpx.post(hostile_server.base_url + COMPLETIONS, content=chunks(), timeout=60)
    assert_error(response, 413)
    assert_still_serves(hostile_server.base_url)


# -- request ids ------------------------------------------------------------------------------------


def post_completion(base_url: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + COMPLETIONS, json=body, timeout=60)


def test_duplicate_request_ids_sent_concurrently(hostile_server):
    """The duplicate arrives while the first streams (after its first chunk, before the 500 tokens or so
    the model length leaves it), then the first is closed: no timing assumption."""
    body = {"prompt": "hi", "max_tokens": 2000, "ignore_eos": True, "request_id": "client-id-1"}

    async def both() -> httpx.Response:
        async with (
            httpx.AsyncClient(base_url=hostile_server.base_url, timeout=60) as client,
            client.stream("POST", COMPLETIONS, json={**body, "stream": True}) as first,
        ):
            assert first.status_code == 200
            lines = first.aiter_lines()
            while not (line := await anext(lines)).startswith("data: "):
                pass
            assert json.loads(line.removeprefix("data: "))["id"] == "client-id-1"
            return await client.post(COMPLETIONS, json={**body, "max_tokens": 2})

    second = asyncio.run(both())
    assert assert_error(second, 400, "request_id")["code"] == "duplicate_request_id"
    deadline = time.monotonic() + 30  # the server sees the first client leave, and aborts its request
    while (again := post_completion(hostile_server.base_url, {**body, "max_tokens": 2})).status_code == 400:
        assert time.monotonic() < deadline, again.text
        time.sleep(0.05)
    assert again.status_code == 200  # the id is free again once its request is over
    assert_still_serves(hostile_server.base_url)


# -- a soak: 200 streams, a fifth of the clients leave mid-stream ------------------------------------


async def soak_stream(client: httpx.AsyncClient, i: int, leave: bool) -> dict:
    path, body = (
        (CHAT, {"messages": [{"role": "user", "content": f"soak {i}"}]})
        if i % 2
        else (
            COMPLETIONS,
            {"prompt": f"soak {i}"},
        )
    )
    body.update(stream=True, max_tokens=24, ignore_eos=True)
    lines: list[str] = []
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "lines": lines, "left": leave}
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
            if leave and len(lines) >= 3:
                break  # closing the response drops the connection
    return {"status": 200, "lines": lines, "left": leave}


def test_soak_200_streams_with_disconnects(hostile_server):
    async def soak() -> list[dict]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=hostile_server.base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(soak_stream(client, i, i % 5 == 0) for i in range(200)))

    results = asyncio.run(soak())
    assert [r["status"] for r in results] == [200] * 200  # no 5xx, no 429
    finished = [r for r in results if not r["left"]]
    assert len(finished) == 160
    for result in finished:
        assert result["lines"][-1] == "data: [DONE]"
        assert sse_payloads(result["lines"])[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.time() + 20
    while time.time() < deadline and (
        metric(hostile_server.base_url, "fdkit:num_requests_running")
        or metric(hostile_server.base_url, "fdkit:kv_cache_usage_perc")
    ):
        time.sleep(0.2)
    assert metric(hostile_server.base_url, "fdkit:num_requests_running") == 0
    assert metric(hostile_server.base_url, "fdkit:num_requests_waiting") == 0
    assert metric(hostile_server.base_url, "fdkit:kv_cache_usage_perc") == 0
    assert_still_serves(hostile_server.base_url)


# -- failures inside: the client gets a message and a request id, the log gets the trace ------------


@pytest.fixture(scope="module")
def local_app(tiny_paddle):
    """The app in this process (through ASGI), to make its insides fail on purpose."""
    from helpers import TEST_ENGINE

    from fdkit import LLM, load_config
    from fdkit.engine.async_engine import AsyncLLM
    from fdkit.serving.openai_app import build_app

    cfg = load_config(["model=ernie", f"model.path={tiny_paddle}", "model.name=ernie-tiny"])
    engine = AsyncLLM(LLM(tiny_paddle, **TEST_ENGINE))
    yield build_app(engine, cfg)
    engine.shutdown()


def call(app, path: str, body: dict) -> httpx.Response:
    async def post():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://fdkit") as client:
            return await client.post(path, json=body)

    return asyncio.run(post())


def test_internal_error_is_500_without_details(local_app, monkeypatch, caplog):
    async def broken(req):
        raise RuntimeError('File "/srv/secret/handlers.py", line 1: boom')

    monkeypatch.setattr(local_app.state.fdkit.serving, "chat", broken)
    response = call(local_app, CHAT, {**GOOD_CHAT, "request_id": "req-500"})
    error = assert_error(response, 500)
    assert error["message"] == "internal error (request id req-500)"
    assert "req-500" in caplog.text and "Traceback" in caplog.text and "/srv/secret" in caplog.text


def test_failure_mid_stream_is_an_error_event_without_details(local_app, monkeypatch, caplog):
    from fdkit.serving.shapes import CompletionShape

    def broken(*args, **kwargs):
        raise KeyError("/srv/secret/shapes.py")

    monkeypatch.setattr(CompletionShape, "stream_choice", broken)
    body = {"prompt": "hi", "max_tokens": 4, "stream": True, "request_id": "req-mid"}
    lines = [line for line in call(local_app, COMPLETIONS, body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    error = sse_payloads(lines)[-1]["error"]
    assert error["message"] == "internal error (request id req-mid)" and not LEAKS.search(lines[-2])
    assert "req-mid" in caplog.text and "Traceback" in caplog.text


def engine_pid(server) -> int:
    import psutil

    children = psutil.Process(server.process.pid).children(recursive=True)
    engines = [c for c in children if "rank_worker" in " ".join(c.cmdline())]
    assert engines, [c.cmdline() for c in children]
    return engines[0].pid


def test_killed_engine_ends_streams_without_a_traceback_and_restarts(tiny_paddle, tmp_path):
    import os

    from server_utils import launch

    srv = launch(tiny_paddle, tmp_path / "server.log", "server.restart_backoff_s=0.1")
    try:
        body = {"prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True, "request_id": "doomed"}
        lines: list[str] = []
        with httpx.stream("POST", srv.base_url + COMPLETIONS, json=body, timeout=60) as response:
            for line in filter(None, response.iter_lines()):
                if not lines:  # generation has started: kill the engine process under it
                    os.kill(engine_pid(srv), signal.SIGKILL)
                lines.append(line)
        assert lines[-1] == "data: [DONE]"
        error = sse_payloads(lines)[-1]["error"]
        assert error["code"] == "engine_unavailable" and "doomed" in error["message"]
        assert not LEAKS.search("\n".join(lines))
        deadline = time.time() + 120
        while time.time() < deadline and httpx.get(srv.base_url + "/health").status_code != 200:
            time.sleep(0.2)
        assert_still_serves(srv.base_url)
        assert metric(srv.base_url, "fdkit:engine_restarts_total") == 1
        assert "doomed" in srv.log_path.read_text()
    finally:
        assert srv.stop() == 0


def test_engine_death_with_exit_policy_stops_the_server(tiny_paddle, tmp_path):
    import os

    from server_utils import launch

    srv = launch(tiny_paddle, tmp_path / "server.log", "server.on_engine_death=exit")
    os.kill(engine_pid(srv), signal.SIGKILL)
    assert srv.process.wait(60) != 0
    srv.stop()


# -- SIGTERM drains ---------------------------------------------------------------------------------

LONG = {"prompt": "hi", "max_tokens": 2000, "ignore_eos": True, "stream": True}
LONG["stream_options"] = {"include_usage": True}


def start_long_streams(base_url: str, count: int) -> tuple[list[threading.Thread], list[list[str]]]:
    streams: list[list[str]] = [[] for _ in range(count)]
    started = threading.Barrier(count + 1, timeout=120)

    def read(lines: list[str]) -> None:
        with httpx.stream("POST", base_url + COMPLETIONS, json=LONG, timeout=300) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 1:
                        started.wait()

    threads = [threading.Thread(target=read, args=(lines,)) for lines in streams]
    for thread in threads:
        thread.start()
    started.wait()
    return threads, streams


def drain_server(tiny_paddle, log_path, grace_s: float):
    from server_utils import launch

    return launch(
        tiny_paddle,
        log_path,
        f"server.shutdown_grace_s={grace_s}",
        "engine.max_model_len=2048",
        "engine.num_kv_blocks=2100",
    )


def test_sigterm_lets_long_streams_finish(tiny_paddle, tmp_path):
    srv = drain_server(tiny_paddle, tmp_path / "server.log", grace_s=240)
    threads, streams = start_long_streams(srv.base_url, 16)
    time.sleep(2)
    signalled = time.time()
    srv.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert_error(
        httpx.post(srv.base_url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2}, timeout=10), 503
    )
    assert_error(httpx.post(srv.base_url + CHAT, json=GOOD_CHAT, timeout=10), 503)
    assert httpx.get(srv.base_url + "/health", timeout=10).status_code == 503
    for thread in threads:
        thread.join(300)
    assert srv.process.wait(60) == 0
    print(f"SIGTERM to exit: {time.time() - signalled:.1f} s")
    for lines in streams:
        payloads = sse_payloads(lines)
        assert lines[-1] == "data: [DONE]"
        assert [p["choices"][0].get("finish_reason") for p in payloads if p["choices"]][-1] == "length"
        assert payloads[-1]["usage"]["completion_tokens"] == 2000
    srv.stop()


def test_sigterm_with_a_short_grace_ends_streams_with_an_error(tiny_paddle, tmp_path):
    srv = drain_server(tiny_paddle, tmp_path / "server.log", grace_s=1)
    threads, streams = start_long_streams(srv.base_url, 16)
    time.sleep(1)
    signalled = time.time()
    srv.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(120)
    assert srv.process.wait(60) == 0
    print(f"SIGTERM to exit with a 1 s grace: {time.time() - signalled:.1f} s")
    for lines in streams:
        assert lines[-1] == "data: [DONE]"
        error = sse_payloads(lines)[-1]["error"]
        assert error["code"] == "engine_unavailable" and "shut down" in error["message"]
    srv.stop()
