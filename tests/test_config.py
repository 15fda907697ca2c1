from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from server_utils import ROOT, Server, free_port

from fdkit.config import CONF_DIR, FdkitConfig, load_config


def group_options():
    return [
        (group.name, path)
        for group in sorted(CONF_DIR.iterdir())
        if group.is_dir()
        for path in sorted(group.glob("*.yaml"))
    ]


def test_default_composes_into_the_typed_schema():
    cfg = load_config()
    assert isinstance(cfg, FdkitConfig)
    assert cfg.tp == 1 and cfg.model.name == "ernie-demo" and cfg.engine.block_size == 64
    assert cfg.server.reasoning_parser == "ernie-x1"  # the demo model thinks as the Thinking model does
    assert cfg.model.tool_parser == "ernie-x1" and cfg.playground.demo_tools  # and calls its tool


@pytest.mark.parametrize(("group", "path"), group_options(), ids=lambda v: getattr(v, "stem", v))
def test_every_group_option_composes_with_its_values(group, path, tmp_path, monkeypatch):
    monkeypatch.setenv("FDKIT_CACHE_DIR", str(tmp_path))  # ernie_tiny writes its checkpoint there
    section = getattr(load_config([f"{group}={path.stem}"]), group)
    for key, value in yaml.safe_load(path.read_text()).items():
        if key != "defaults" and not (isinstance(value, str) and "${" in value):
            assert getattr(section, key) == value, key


def test_default_yaml_files_repeat_no_schema_default():
    defaults = FdkitConfig()
    for group, path in group_options():
        if path.stem == "default":
            for key, value in yaml.safe_load(path.read_text()).items():
                assert key == "defaults" or getattr(getattr(defaults, group), key) != value, (path, key)


def test_cli_style_overrides_and_type_checks():
    cfg = load_config(["model=ernie", "tp=2", "engine.block_size=16", "engine.max_model_len=null"])
    assert cfg.tp == 2 and cfg.engine.block_size == 16 and cfg.engine.max_model_len is None
    assert Path(cfg.model.path).name == "ERNIE-4.5-0.3B-Paddle"
    with pytest.raises(Exception, match="block_size"):
        load_config(["engine.block_size=lots"])


def test_paths_and_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("FDKIT_MODEL_DIR", "/data/models")
    monkeypatch.setenv("FDKIT_API_KEY", "k1, k2")
    cfg = load_config(["model=ernie"])
    assert cfg.model.path == "/data/models/ERNIE-4.5-0.3B-Paddle" and cfg.server.api_keys == ["k1", "k2"]
    assert load_config(["server.api_keys=[k3]"]).server.api_keys == ["k3"]
    monkeypatch.delenv("FDKIT_API_KEY")
    assert load_config().server.api_keys == []


def test_tiny_model_is_written_once_by_its_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FDKIT_CACHE_DIR", str(tmp_path))
    path = Path(load_config(["model=ernie_tiny"]).model.path)
    assert path == tmp_path / "ernie_tiny" and (path / "config.json").is_file()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert Path(load_config(["model=ernie_tiny"]).model.path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_real_ernie_without_weights_names_the_expected_folder(monkeypatch, tmp_path):
    from fdkit import LLM

    monkeypatch.setenv("FDKIT_MODEL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/ERNIE-4.5-0.3B-Paddle"):
        LLM.from_config(["model=ernie"])


def source_copy(dest: Path) -> Path:
    """The repo's files that git tracks or would (not build/, .venv/, caches), copied into `dest`."""
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    names = subprocess.run(listing, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for name in filter(None, names.split("\0")):
        if (ROOT / name).is_file():  # not a file deleted since the last commit
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_installed_package_serves_from_another_folder(tmp_path):
    """A non-editable install: its conf/ ships inside, `fdkit serve` runs, no output folder is left."""
    target, cwd = tmp_path / "site", tmp_path / "cwd"
    cwd.mkdir()
    before = sorted(ROOT.iterdir())
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
    subprocess.run(
        [*pip, "--target", str(target), str(source_copy(tmp_path / "src"))], check=True, timeout=300
    )
    assert sorted(ROOT.iterdir()) == before  # built in the copy: no build/ or *.egg-info left in the repo
    env = {"PYTHONPATH": str(target), "FDKIT_CACHE_DIR": str(tmp_path / "cache")}
    check = "import fdkit; print(fdkit.__file__, fdkit.load_config(['model=ernie_tiny']).model.path)"
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert out.stdout.startswith(str(target)) and str(tmp_path / "cache") in out.stdout, out.stderr
    port = free_port()
    command = [str(target / "bin" / "fdkit"), "serve", "model=ernie_tiny", f"server.port={port}"]
    command += ["server.host=127.0.0.1", "engine.max_model_len=256", "playground.enabled=false"]
    server = Server(command, port, tmp_path / "server.log", env, cwd=cwd).wait_healthy()
    try:
        assert httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"] == "ernie-tiny"
    finally:
        assert server.stop() == 0
    assert list(cwd.iterdir()) == []
