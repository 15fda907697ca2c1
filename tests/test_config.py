from __future__ import annotations

from pathlib import Path

import pytest

from fdkit.config import CONF_DIR, load_config


def group_options():
    return [
        (group.name, yaml.stem)
        for group in sorted(CONF_DIR.iterdir())
        if group.is_dir()
        for yaml in sorted(group.glob("*.yaml"))
    ]


def test_default_composes():
    cfg = load_config()
    assert cfg.tp == 1 and cfg.model.name == "ernie-demo" and cfg.engine.block_size == 64
    assert cfg.server.reasoning_parser == "ernie-45-vl"  # the demo model thinks


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_group_option_composes(group, option):
    cfg = load_config([f"{group}={option}"])
    assert cfg[group] is not None


def test_cli_style_overrides_and_type_checks():
    cfg = load_config(["model=ernie", "tp=2", "engine.block_size=16", "engine.max_model_len=null"])
    assert cfg.tp == 2 and cfg.engine.block_size == 16 and cfg.engine.max_model_len is None
    assert Path(cfg.model.path).name == "ERNIE-4.5-0.3B-Paddle"
    with pytest.raises(Exception, match="block_size"):
        load_config(["engine.block_size=lots"])


def test_paths_from_environment(monkeypatch):
    monkeypatch.setenv("FDKIT_MODEL_DIR", "/data/models")
    assert load_config(["model=ernie"]).model.path == "/data/models/ERNIE-4.5-0.3B-Paddle"


def test_real_ernie_without_weights_names_the_expected_folder(monkeypatch, tmp_path):
    from fdkit import LLM

    monkeypatch.setenv("FDKIT_MODEL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/ERNIE-4.5-0.3B-Paddle"):
        LLM.from_config(["model=ernie"])
