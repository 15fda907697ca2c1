"""The two ways to start the server and the seed document's examples as written (SIGTERM's drain is in
test_hostile_clients.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest
from server_utils import Server, free_port


@pytest.fixture(scope="module")
def fastdeploy_server(tiny_paddle, tmp_path_factory):
    """Started with FastDeploy's flags, as an existing script would."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "fdkit.entrypoints.openai.api_server",
        "--model",
        str(tiny_paddle),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--tensor-parallel-size",
        "1",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        "--block-size",
        "16",
        "--override",
        "engine.num_kv_blocks=64",
        "--enable-logprob",
    ]
    srv = Server(command, port, tmp_path_factory.mktemp("fd") / "server.log").wait_healthy()
    yield srv
    srv.stop()


def test_fastdeploy_command_serves_the_same_api(fastdeploy_server, tiny_paddle):
    models = httpx.get(fastdeploy_server.base_url + "/v1/models").json()
    assert models["data"][0]["id"] == tiny_paddle.name and models["data"][0]["max_model_len"] == 512
    assert "--enable-logprob" in fastdeploy_server.log_path.read_text()  # an unmapped flag is reported


def test_seed_curl_example(fastdeploy_server):
    """`curl -X POST "http://0.0.0.0:8188/v1/chat/completions"` from FastDeploy's document, port aside."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    url = f"http://0.0.0.0:{fastdeploy_server.port}/v1/chat/completions"
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


def test_seed_python_example(fastdeploy_server):
    """The document's Python example, verbatim but for the port."""
    script = f'''
import openai
host = "0.0.0.0"
port = "{fastdeploy_server.port}"
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
