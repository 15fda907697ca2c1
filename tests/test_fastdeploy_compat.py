"""Issue 17: a FastDeploy user's flags work verbatim (mapped, or accepted with a warning that says why),
/metrics is served on --metrics-port behind the same API keys, and a server that cannot start says why
in one line, with a non-zero exit status and no traceback, before any weight is read."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import pytest
from hub_standin import HubStandIn
from server_utils import ROOT, Server, free_port
from test_memory_plan import A3B, needs_moe

from fdkit.entrypoints.openai.api_server import (
    ignored_warnings,
    load_fastdeploy_config,
    node_flags,
    parse_args,
)
from fdkit.entrypoints.openai.fastdeploy_flags import MAPPED, MAPPED_SWITCHES, SWITCH, TOGGLE, ignored_flags

API_SERVER = [sys.executable, "-m", "fdkit.entrypoints.openai.api_server"]


def test_every_fastdeploy_flag_is_mapped_or_explained():
    argv = ["--model", "m"]
    for flag, (kind, _) in ignored_flags().items():
        argv += [flag] if kind in (SWITCH, TOGGLE) else [flag, "1"]
    warnings = ignored_warnings(parse_args(argv))
    assert len(warnings) == len(ignored_flags()) > 70
    assert (
        "--enable-prefix-caching is accepted but has no effect (fdkit's prefix cache is on by default"
        in warnings[list(ignored_flags()).index("--enable-prefix-caching")]
    )
    assert ignored_warnings(parse_args(["--model", "m", "--no-enable-prefix-caching"]))
    with pytest.raises(SystemExit):  # neither FastDeploy's nor fdkit's: an error, as in FastDeploy
        parse_args(["--model", "m", "--max-model-length", "8"])


def test_flags_map_onto_the_config(tmp_path):
    argv = ["--model", "baidu/ERNIE-4.5-0.3B-Paddle", "-tp", "2", "--gpu-memory-utilization", "0.7"]
    argv += ["--num-gpu-blocks-override", "128", "--metrics-port", "9001", "--revision", "v1"]
    argv += ["--enable-expert-parallel", "--api-key", "a", "--api-key", "b", "--max-model-len", "32768"]
    cfg = load_fastdeploy_config(parse_args([*argv, "--data-parallel-size", "3"]))
    assert cfg.model.path == "baidu/ERNIE-4.5-0.3B-Paddle" and cfg.model.name == "ERNIE-4.5-0.3B-Paddle"
    assert (cfg.tp, cfg.dp, cfg.engine.memory_utilization, cfg.engine.num_kv_blocks) == (2, 3, 0.7, 128)
    assert (cfg.server.metrics_port, cfg.model.revision, cfg.engine.expert_parallel) == (9001, "v1", True)
    assert cfg.server.api_keys == ["a", "b"] and cfg.engine.max_model_len == 32768
    assert cfg.engine.kv_cache_gib is None  # sized from memory


def test_ips_name_the_nodes_and_this_host_among_them():
    args = parse_args(["--model", "m", "-tp", "4", "--ips", "198.51.100.7, 127.0.0.1"])  # TEST-NET-2
    cfg = load_fastdeploy_config(args)
    assert (cfg.engine.nnodes, cfg.engine.master_addr, cfg.engine.node_rank) == (2, "198.51.100.7", 1)
    assert node_flags("127.0.0.1")["engine.node_rank"] == 0
    with pytest.raises(ValueError, match="none of these addresses is this host's"):
        node_flags("198.51.100.7,203.0.113.9")


def test_config_file_as_fastdeploy_reads_it(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        "model: m\nmax_model_len: 8192\ntensor_parallel_size: 2\nport: 9000\nenable_prefix_caching: true\n"
    )
    args = parse_args(["--config", str(path), "--port", "9002"])
    cfg = load_fastdeploy_config(args)
    assert (cfg.engine.max_model_len, cfg.tp, cfg.server.port) == (8192, 2, 9002)  # the command line wins
    assert ignored_warnings(args)[0].startswith("--enable-prefix-caching")


@pytest.mark.parametrize(
    "flag, value, attribute",
    [
        ("--api-key", "sk-ab/c+d==", "server.api_keys"),
        ("--api-key", "a,b", "server.api_keys"),
        ("--api-key", "x${oc.env:HOME}y", "server.api_keys"),
        ("--model", "/data/my model(v2)", "model.path"),
        ("--served-model-name", "a,b", "server.served_model_name"),
        ("--served-model-name", "it's [x]=${y}", "server.served_model_name"),
        ("--host", "::1", "server.host"),
    ],
)
def test_free_text_flags_are_taken_verbatim(flag, value, attribute):
    argv = ["--model", "m", flag, value] if flag != "--model" else ["--model", value]
    cfg = load_fastdeploy_config(parse_args(argv))
    section, name = attribute.split(".")
    expected = [value] if flag == "--api-key" else value
    assert getattr(getattr(cfg, section), name) == expected


def test_an_override_wins_over_a_free_text_flag():
    argv = ["--model", "m", "--served-model-name", "a", "--override", "server.served_model_name=b"]
    assert load_fastdeploy_config(parse_args(argv)).server.served_model_name == "b"
    assert load_fastdeploy_config(parse_args(["--model", "/x/my model"])).model.name == "my model"


def test_ernie_x1_reasoning_parser_always_thinks():
    cfg = load_fastdeploy_config(parse_args(["--model", "m", "--reasoning-parser", "ernie-x1"]))
    assert cfg.model.always_thinks and cfg.server.reasoning_parser == "ernie-x1"
    cfg = load_fastdeploy_config(parse_args(["--model", "m", "--reasoning-parser", "ernie-45-vl"]))
    assert not cfg.model.always_thinks


def test_the_docs_table_names_every_flag():
    doc = (ROOT / "docs" / "fastdeploy_flags.md").read_text()
    flags = [*MAPPED, *MAPPED_SWITCHES, *ignored_flags(), "--model", "--api-key", "--config", "--ips"]
    assert [flag for flag in flags if f"`{flag}`" not in doc] == []


@pytest.fixture(scope="module")
def metrics_server(tiny_paddle, tmp_path_factory):
    port, metrics_port = free_port(), free_port()
    command = [*API_SERVER, "--model", str(tiny_paddle), "--port", str(port), "--host", "127.0.0.1"]
    command += ["--metrics-port", str(metrics_port), "--api-key", "k1", "--max-model-len", "512"]
    command += ["--block-size", "16", "--num-gpu-blocks-override", "64", "--enable-prefix-caching"]
    command += ["--quantization", "wint8", "--engine-worker-queue-port", "8182", "--enable-logprob"]
    command += ["--override", "playground.enabled=false"]
    srv = Server(command, port, tmp_path_factory.mktemp("fd") / "server.log").wait_healthy()
    srv.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield srv
    srv.stop()


def test_metrics_on_the_metrics_port_with_the_same_keys(metrics_server):
    key = {"Authorization": "Bearer k1"}
    assert httpx.get(metrics_server.metrics_url).status_code == 401
    scrape = httpx.get(metrics_server.metrics_url, headers=key)
    assert scrape.status_code == 200 and "fdkit:num_requests_running" in scrape.text
    assert httpx.get(metrics_server.base_url + "/metrics", headers=key).status_code == 404  # as FastDeploy
    log = metrics_server.log_path.read_text()
    for flag in (
        "--enable-prefix-caching",
        "--quantization",
        "--engine-worker-queue-port",
        "--enable-logprob",
    ):
        assert f"{flag} is accepted but has no effect (" in log


def failed_start(command: list[str], env: dict | None = None) -> str:
    """The one error line of a start that must fail early."""
    out = subprocess.run(
        command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120
    )
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert out.returncode == 1 and "Traceback" not in text and "Loading weights" not in text, text[-3000:]
    assert len(errors) == 1 and "cannot start: " in errors[0], text[-3000:]
    return errors[0]


def test_missing_model_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "FDKIT_MODEL_DIR": str(tmp_path)}
    line = failed_start(
        [*API_SERVER, "--model", "baidu/ERNIE-4.5-0.3B-Paddle", "--port", str(free_port())], env
    )
    assert line.endswith(
        f"hf download baidu/ERNIE-4.5-0.3B-Paddle --local-dir {tmp_path}/ERNIE-4.5-0.3B-Paddle"
    )


def test_bfloat16_on_cpu_without_the_compiled_step_is_refused_before_serving(tiny_paddle):
    """bf16 on CPU runs only compiled (tests/test_compiled.py); float16 never."""
    command = [sys.executable, "launch.py", "model=ernie", f"model.path={tiny_paddle}"]
    line = failed_start(
        [*command, "engine.dtype=bfloat16", "engine.compile=false", f"server.port={free_port()}"]
    )
    assert "engine.dtype=bfloat16 on CPU needs the compiled step (engine.compile=true)" in line
    line = failed_start([*command, "engine.dtype=float16", f"server.port={free_port()}"])
    assert "engine.dtype=float16 cannot run on CPU" in line and "use engine.dtype=float32" in line


def test_port_in_use_is_found_before_the_model_loads(tiny_paddle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "fdkit.cli", "serve", "model=ernie", f"model.path={tiny_paddle}"]
        line = failed_start([*command, "server.host=127.0.0.1", f"server.port={port}"])
    assert f"port {port} on 127.0.0.1 is not free (Address already in use)" in line


@needs_moe
def test_a_model_too_big_is_refused_before_its_weights_download(tmp_path):
    published = tmp_path / "published"
    published.mkdir()
    (published / "config.json").write_text(json.dumps(A3B))
    (published / "model-00001-of-00001.safetensors").write_bytes(b"never fetched")
    hub = HubStandIn({"baidu/ERNIE-4.5-21B-A3B-Paddle": published})
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    env["FDKIT_MODEL_DIR"] = str(tmp_path / "models")
    try:
        command = [*API_SERVER, "--model", "baidu/ERNIE-4.5-21B-A3B-Paddle", "--port", str(free_port())]
        line = failed_start(command, env)
    finally:
        hub.close()
    assert "ERNIE-4.5-21B-A3B-Paddle needs 88.4 GB of weights in float32" in line
    assert not any("safetensors" in request for request in hub.requests)
