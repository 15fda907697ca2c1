from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TEST_ENGINE

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_paddle(tmp_path_factory) -> Path:
    from fdkit.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_paddle", "tiny", "paddle", seed=0)


@pytest.fixture(scope="session")
def tiny_pt(tmp_path_factory) -> Path:
    from fdkit.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_pt", "tiny", "pt", seed=0)


@pytest.fixture(scope="session")
def llm(tiny_paddle):
    from fdkit import LLM

    engine = LLM(tiny_paddle, **TEST_ENGINE)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def server(tiny_paddle, tmp_path_factory):
    """A live server on the tiny checkpoint, default settings."""
    from server_utils import launch

    srv = launch(tiny_paddle, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="null", max_retries=0, timeout=60)
