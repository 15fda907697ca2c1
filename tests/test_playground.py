"""The Gradio playground, mounted on the server: through gradio_client and in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from server_utils import Server, free_port, launch_config

from fdkit import load_config
from fdkit.playground import DEMO_TOOLS, TOOL_CALL_TITLE, TOOL_RESULT_TITLE, Turn
from fdkit.tokenizer import Tokenizer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def start(tmp_path_factory, name: str, *overrides: str) -> Server:
    return launch_config(tmp_path_factory.mktemp(name) / "server.log", "engine.kv_cache_gib=0.05", *overrides)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    srv = start(tmp_path_factory, "pg-demo")
    yield srv
    srv.stop()


def ask(client, message: str, thinking: bool = True, max_tokens: int = 256):
    return client.predict(message, [], "ernie-demo", "", 0.0, 1.0, max_tokens, thinking, 0, api_name="/chat")


def texts(message: dict) -> str:
    content = message["content"]
    return "".join(part.get("text", "") for part in content) if isinstance(content, list) else str(content)


def test_gradio_client_chat_shows_thinking_apart(demo_server):
    from gradio_client import Client

    assert "playground at" in demo_server.log_path.read_text()
    client = Client(demo_server.base_url + "/playground/", verbose=False)
    chat, stats, textbox = ask(client, "What is 4721-385?")
    user, thought, answer = chat[-3:]
    assert texts(user) == "What is 4721-385?" and textbox == ""
    assert thought["metadata"]["title"] == "Thinking" and thought["metadata"]["status"] == "done"
    assert "1-5-0=6 1" in texts(thought)
    assert texts(answer).strip() == "4336" and not answer["metadata"].get("title")
    assert re.search(
        r"prompt \d+ tokens · completion \d+ tokens · time to first token \d+ ms · [\d.]+ tokens/s", stats
    )


def test_reasoning_is_not_sent_back_in_later_turns(demo_server):
    """The second turn's prompt holds the first answer only: its token count proves it."""
    from gradio_client import Client

    client = Client(demo_server.base_url + "/playground/", verbose=False)
    ask(client, "What is 12+30?")
    _, stats, _ = ask(client, "计算 47+85")
    tokenizer = Tokenizer(load_config(["model=ernie_demo"]).model.path)
    conversation = [
        {"role": "user", "content": "What is 12+30?"},
        {"role": "assistant", "content": "42\n"},  # the content as the server sent it
        {"role": "user", "content": "计算 47+85"},
    ]
    # the demo's playground offers its tool on every request (playground.demo_tools, on with the demo)
    prompt = tokenizer.apply_chat_template(conversation, enable_thinking=True, tools=DEMO_TOOLS)
    expected = len(tokenizer.encode(prompt))
    assert f"prompt {expected} tokens" in stats


def test_demo_tools_close_the_loop(demo_server):
    """The model calls multiply, the playground runs it and sends the result back, the model answers:
    question, Thinking, tool call, tool result, Thinking and answer each as its own block."""
    from gradio_client import Client

    client = Client(demo_server.base_url + "/playground/", verbose=False)
    chat, stats, _ = ask(client, "What is 37*91?")
    titles = [kind((m.get("metadata") or {}).get("title")) for m in chat]
    assert titles == [
        None,
        "Thinking",
        f"{TOOL_CALL_TITLE}: multiply",
        f"{TOOL_RESULT_TITLE}: multiply",
        "Thinking",
        None,
    ]
    assert json.loads(texts(chat[2]).strip("`json\n")) == {"a": 37, "b": 91}
    assert json.loads(texts(chat[3]).strip("`json\n")) == {"result": 3367}
    assert texts(chat[-1]).strip() == "3367" and "2 requests" in stats
    # the next turn sends the call and its result back (the session's history): its prompt holds them
    _, stats, _ = ask(client, "计算 12+30")
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 37, "b": 91}}}
    conversation = [
        {"role": "user", "content": "What is 37*91?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": '{"result": 3367}'},
        {"role": "assistant", "content": "3367\n"},
        {"role": "user", "content": "计算 12+30"},
    ]
    tokenizer = Tokenizer(load_config(["model=ernie_demo"]).model.path)
    prompt = tokenizer.apply_chat_template(conversation, enable_thinking=True, tools=DEMO_TOOLS)
    assert f"prompt {len(tokenizer.encode(prompt))} tokens" in stats and "requests" not in stats


def kind(title: str | None) -> str | None:
    """A block's title without its detail: `Tool call: multiply`."""
    return title and title.split(" · ")[0]


class Delta:
    def __init__(self, content=None, reasoning=None, tool_calls=None):
        self.content, self.tool_calls = content, tool_calls
        self.model_extra = {"reasoning_content": reasoning}


class Chunk:
    def __init__(self, delta=None, usage=None):
        self.choices = [type("Choice", (), {"delta": delta})] if delta else []
        self.usage = usage


def call_delta(index, id=None, name=None, arguments=None):
    function = type("Function", (), {"name": name, "arguments": arguments})
    return type("ToolCallDelta", (), {"index": index, "id": id, "function": function})


def test_a_streamed_tool_call_is_its_own_block():
    """Issue 14's part: whatever the model, calls streamed OpenAI's way (name first, then arguments in
    pieces, several by index) show apart from the reasoning and the answer."""
    turn = Turn("weather?")
    turn.add(Chunk(Delta(reasoning="The user wants the weather.")))
    turn.add(Chunk(Delta(tool_calls=[call_delta(0, "call-1", "get_weather", "")])))
    turn.add(Chunk(Delta(tool_calls=[call_delta(0, arguments='{"location": ')])))
    turn.add(Chunk(Delta(tool_calls=[call_delta(1, "call-2", "get_time", '{"zone": "UTC"}')])))
    turn.add(Chunk(Delta(tool_calls=[call_delta(0, arguments='"北京"}')])))
    shown = turn.messages()
    titles = [kind((m.metadata or {}).get("title")) for m in shown]
    assert titles == [None, "Thinking", f"{TOOL_CALL_TITLE}: get_weather", f"{TOOL_CALL_TITLE}: get_time"]
    assert '{"location": "北京"}' in shown[2].content and "UTC" in shown[3].content
    assert "北京" not in shown[1].content
    messages = turn.run_tools(lambda name, arguments: f"{name} ran")
    assert [m["role"] for m in messages] == ["assistant", "tool", "tool"]
    assert messages[0]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"location": "北京"}',
    }
    assert [m["tool_call_id"] for m in messages[1:]] == ["call-1", "call-2"]
    turn.add(Chunk(Delta(content="Sunny.")))
    titles = [kind((m.metadata or {}).get("title")) for m in turn.messages()]
    assert titles[2:] == [
        f"{TOOL_CALL_TITLE}: get_weather",
        f"{TOOL_RESULT_TITLE}: get_weather",
        f"{TOOL_CALL_TITLE}: get_time",
        f"{TOOL_RESULT_TITLE}: get_time",
        None,
    ]
    assert turn.answer == "Sunny." and "get_time ran" in turn.messages()[5].content


def test_server_errors_are_readable_messages(tmp_path_factory):
    """A playground pointed at a server that is not there, and a 4xx from one that is."""
    from gradio_client import Client

    dead = free_port()
    srv = start(tmp_path_factory, "pg-dead", f"playground.base_url=http://127.0.0.1:{dead}/v1")
    try:
        client = Client(srv.base_url + "/playground/", verbose=False)
        chat, _, _ = ask(client, "hello")
        assert "cannot be reached" in texts(chat[-1]) and "Traceback" not in texts(chat[-1])
    finally:
        srv.stop()


def test_a_4xx_is_shown_in_the_chat(demo_server):
    from gradio_client import Client

    client = Client(demo_server.base_url + "/playground/", verbose=False)
    chat, _, _ = ask(client, "word " * 600)  # longer than max_model_len
    assert "refused the request (400)" in texts(chat[-1]) and "too long" in texts(chat[-1])


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium") and not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield chromium
        chromium.close()


def ask_in_browser(browser, server, question: str, answer: str, png: Path):
    """The page after asking `question` and seeing `answer` and the stats line; a screenshot in `png`."""
    page = browser.new_page(viewport={"width": 1100, "height": 1100})
    page.goto(server.base_url + "/playground/")
    page.locator("#message textarea").fill(question)
    page.locator("#send").click()
    page.locator("#chat").get_by_text(answer, exact=True).wait_for(timeout=30_000)
    page.locator("#stats").get_by_text(re.compile("tokens/s")).wait_for(timeout=10_000)
    page.screenshot(path=str(png), full_page=True)
    assert png.stat().st_size > 10_000
    print("screenshot:", png)
    return page


def test_browser_shows_thinking_and_answer(browser, demo_server, tmp_path):
    page = ask_in_browser(browser, demo_server, "What is 4721-385?", "4336", tmp_path / "playground.png")
    assert page.locator("#chat").get_by_text("Thinking").count() >= 1


def test_browser_shows_a_tool_call_and_its_result(browser, demo_server, tmp_path):
    """The demo's round trip as a visitor sees it: question, Thinking, tool call, tool result, Thinking
    and answer, each its own block."""
    page = ask_in_browser(browser, demo_server, "计算 37×91", "3367", tmp_path / "playground_tools.png")
    chat = page.locator("#chat")
    assert chat.get_by_text(f"{TOOL_CALL_TITLE}: multiply").count() == 1
    assert chat.get_by_text(f"{TOOL_RESULT_TITLE}: multiply").count() == 1
    assert chat.get_by_text("Thinking").count() == 2
    assert chat.get_by_text('multiply · {"a": 37, "b": 91}').count() == 1  # seen without a click
    assert chat.get_by_text('multiply · {"result": 3367}').count() == 1
    assert "2 requests" in page.locator("#stats").inner_text()


def test_browser_stop_aborts_a_long_generation(browser, tmp_path_factory, tiny_paddle):
    """On a random-weight model (which rarely stops by itself), Stop ends the request and frees its blocks."""
    srv = start(
        tmp_path_factory,
        "pg-tiny",
        "model=ernie",
        f"model.path={tiny_paddle}",
        "model.name=tiny",
        "server.reasoning_parser=null",
        "engine.max_model_len=4096",
        "playground.max_tokens=4000",  # a long reply (no EOS before 3000 tokens): Stop comes first
        "sampling.min_tokens=3000",
    )
    try:
        page = browser.new_page()
        page.goto(srv.base_url + "/playground/")
        page.locator("#message textarea").fill("hello")
        page.locator("#send").click()
        deadline = time.time() + 20
        while "fdkit:num_requests_running 1.0" not in httpx.get(srv.base_url + "/metrics").text:
            assert time.time() < deadline, "the request never started"
            time.sleep(0.05)
        page.locator("#stop").click()
        deadline = time.time() + 10
        metrics = ""
        while time.time() < deadline:
            metrics = httpx.get(srv.base_url + "/metrics").text
            if 'finish_reason="abort"} 1.0' in metrics:
                break
            time.sleep(0.1)
        finished = re.findall(r'request_success_total\{finish_reason="(\w+)"\} (\S+)', metrics)
        assert 'fdkit:request_success_total{finish_reason="abort"} 1.0' in metrics, finished
        assert "fdkit:kv_cache_usage_perc 0.0" in metrics
    finally:
        srv.stop()
