"""The seed document's commands as written (/work/shared/seeds/fastdeploy_openai_serving_zh.txt): its
server command, fdkit's module for FastDeploy's and a free port for 8188, the hub id downloaded from a
stand-in endpoint on 127.0.0.1; then its curl and Python examples (SIGTERM's drain is in
test_hostile_clients.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest
from hub_standin import HubStandIn
from server_utils import Server, free_port

SEED_COMMAND = (
    "python -m fastdeploy.entrypoints.openai.api_server --model baidu/ERNIE-4.5-0.3B-Paddle "
    "--port 8188 --tensor-parallel-size 8 --max-model-len 32768"
)
MAX_TOKENS = 32  # a random-weight model seldom ends its reply: a server-side cap keeps the examples short


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory):
    """A tiny ERNIE 4.5 with 8 attention heads (the seed's tp=8 splits them), published as the seed's."""
    from fdkit import tiny

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tiny.PRESETS, "tiny-8-heads", {**tiny.PRESETS["tiny"], "num_attention_heads": 8})
        folder = tmp_path_factory.mktemp("published") / "ERNIE-4.5-0.3B-Paddle"
        return tiny.write_checkpoint(folder, "tiny-8-heads", "paddle", seed=0)


@pytest.fixture(scope="module")
def seed_server(seed_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seed")
    hub = HubStandIn({"baidu/ERNIE-4.5-0.3B-Paddle": seed_checkpoint})
    port = free_port()
    argv = SEED_COMMAND.replace("fastdeploy.", "fdkit.").replace("8188", str(port)).split()
    command = [sys.executable, *argv[1:], "--override", f"sampling.max_tokens={MAX_TOKENS}"]
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "0"}
    env["FDKIT_MODEL_DIR"] = str(tmp / "models")  # empty: the model comes from the endpoint
    srv = Server(command, port, tmp / "server.log", env).wait_healthy(timeout=240)
    srv.hub = hub
    yield srv
    srv.stop()
    hub.close()


def test_seed_server_command(seed_server):
    models = httpx.get(seed_server.base_url + "/v1/models").json()
    assert models["data"][0]["id"] == "ERNIE-4.5-0.3B-Paddle" and models["data"][0]["max_model_len"] == 32768
    log = seed_server.log_path.read_text()
    assert "tensor-parallel engine ready: 8 ranks" in log
    assert "max_model_len 32768" in log and "memory plan for ERNIE-4.5-0.3B-Paddle" in log
    assert any(r.endswith(".safetensors") and r.startswith("GET") for r in seed_server.hub.requests)


def test_seed_curl_example(seed_server):
    """`curl -X POST "http://0.0.0.0:8188/v1/chat/completions"` from FastDeploy's document, port aside."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    url = f"http://0.0.0.0:{seed_server.port}/v1/chat/completions"
    body = '{\n  "messages": [\n    {"role": "user", "content": "Hello!"}\n  ]\n}'
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", url, "-H", "Content-Type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=120,
    )
    response = json.loads(out.stdout)
    assert (
        response["object"] == "chat.completion" and response["choices"][0]["message"]["content"] is not None
    )


def test_seed_python_example(seed_server):
    """The document's Python example, verbatim but for the port."""
    script = f'''
import openai
host = "0.0.0.0"
port = "{seed_server.port}"
client = openai.Client(base_url=f"http://{{host}}:{{port}}/v1", api_key="null")

response = client.chat.completions.create(
    model="null",
    messages=[
        {{"role": "system", "content": "I'm a helpful AI assistant."}},
        {{"role": "user", "content": "把李白的静夜思改写为现代诗"}},
    ],
    stream=True,
)
for chunk in response:
    if chunk.choices[0].delta:
        print(chunk.choices[0].delta.content, end='')
print('\\n')
'''
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "None" not in out.stdout
