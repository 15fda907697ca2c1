"""The Gradio playground, mounted on the server: through gradio_client and in a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest
from server_utils import Server, free_port, launch_config

from fdkit import load_config
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
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "计算 47+85"},
    ]
    expected = len(tokenizer.encode(tokenizer.apply_chat_template(conversation, enable_thinking=True)))
    assert f"prompt {expected} tokens" in stats


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


def test_browser_shows_thinking_and_answer(browser, demo_server, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(demo_server.base_url + "/playground/")
    page.locator("#message textarea").fill("What is 4721-385?")
    page.locator("#send").click()
    chat = page.locator("#chat")
    chat.get_by_text("4336", exact=True).wait_for(timeout=30_000)
    assert chat.get_by_text("Thinking").count() >= 1
    page.locator("#stats").get_by_text(re.compile("tokens/s")).wait_for(timeout=10_000)
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    print("screenshot:", tmp_path / "playground.png")


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
