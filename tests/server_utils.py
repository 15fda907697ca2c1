"""Starting a real fdkit server (python launch.py ...) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers import TEST_COMPILE_CACHE

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self, command: list[str], port: int, log_path: Path, env: dict | None = None, cwd: Path = ROOT
    ):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_healthy(self, timeout: float = 120) -> Server:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}"
                )
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not healthy in {timeout}s:\n{self.log_path.read_text()}")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def launch_config(log_path: Path, *overrides: str, env: dict | None = None) -> Server:
    """`python launch.py` with small-engine settings and the given overrides (the default model if none)."""
    port = free_port()
    command = [
        sys.executable,
        "launch.py",
        f"server.port={port}",
        "server.host=127.0.0.1",
        "engine.max_model_len=512",
        "engine.show_progress=false",
        f"engine.compile_cache_dir={TEST_COMPILE_CACHE}",
        *overrides,
    ]
    return Server(command, port, log_path, env).wait_healthy()


def launch(checkpoint: Path, log_path: Path, *overrides: str, env: dict | None = None) -> Server:
    """A server on a test checkpoint, without the playground."""
    return launch_config(
        log_path,
        "model=ernie",
        f"model.path={checkpoint}",
        "model.name=ernie-tiny",
        "engine.num_kv_blocks=96",
        "engine.block_size=16",
        "engine.max_num_seqs=16",
        "playground.enabled=false",
        *overrides,
        env=env,
    )
