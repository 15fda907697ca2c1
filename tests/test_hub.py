"""Hub ids (fdkit/hub.py): ORG/NAME found in $FDKIT_MODEL_DIR, in the Hugging Face cache, or downloaded
from HF_ENDPOINT (here a stand-in on 127.0.0.1 serving a tiny checkpoint: no network); a local path
always wins; offline, one line says what is missing and how to fetch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
from hub_standin import COMMIT, HubStandIn

from fdkit.hub import ModelNotFoundError, resolve_model

REPO = "baidu/ERNIE-4.5-0.3B-Paddle"
RESOLVE = "from fdkit.hub import resolve_model; print(resolve_model({!r}, before_weights=print))"


@pytest.fixture
def hub_env(tmp_path, tiny_paddle):
    hub = HubStandIn({REPO: tiny_paddle})
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "FDKIT_MODEL_DIR": str(tmp_path / "models"),
    }
    yield hub, env
    hub.close()


def resolve_in_subprocess(env: dict, spec: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RESOLVE.format(spec)], env=env, capture_output=True, text=True, timeout=120
    )


def test_download_from_the_endpoint_then_found_in_the_cache_offline(hub_env, tiny_paddle):
    hub, env = hub_env
    out = resolve_in_subprocess(env)
    before_weights, folder = out.stdout.split()  # the snapshot, first with config.json alone
    assert out.returncode == 0 and folder.endswith(f"snapshots/{COMMIT}") and before_weights == folder
    assert sorted(os.listdir(folder)) == sorted(p.name for p in tiny_paddle.iterdir())
    assert f"GET /{REPO}/resolve/{COMMIT}/model-00001-of-00002.safetensors" in hub.requests
    hub.requests.clear()
    offline = resolve_in_subprocess({**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0 and offline.stdout.split() == [folder] and not hub.requests


def test_a_refusal_before_weights_downloads_no_weights(hub_env):
    hub, env = hub_env
    script = (
        "from fdkit.hub import resolve_model\n"
        "def refuse(folder): raise ValueError('too big')\n"
        f"resolve_model({REPO!r}, before_weights=refuse)"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "ValueError: too big" in out.stderr
    assert any("config.json" in r for r in hub.requests)
    assert not any("safetensors" in r or "tokenizer" in r for r in hub.requests)


def test_offline_says_what_is_missing_and_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FDKIT_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    command = f"hf download {REPO} --local-dir {tmp_path}/models/ERNIE-4.5-0.3B-Paddle"
    with pytest.raises(ModelNotFoundError) as offline:
        resolve_model(REPO)
    assert str(offline.value).endswith(f"HF_HUB_OFFLINE is set; fetch it with: {command}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelNotFoundError, match=r"downloads are off \(model.download=false\)"):
        resolve_model(REPO, download=False)


def test_model_dir_then_local_paths_win(tmp_path, monkeypatch, tiny_paddle):
    models = tmp_path / "models"
    (models / "ERNIE-4.5-0.3B-Paddle").mkdir(parents=True)
    (models / "ERNIE-4.5-0.3B-Paddle" / "config.json").write_text(json.dumps({}))
    monkeypatch.setenv("FDKIT_MODEL_DIR", str(models))
    assert resolve_model(REPO, download=False) == models / "ERNIE-4.5-0.3B-Paddle"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "baidu").mkdir()
    (tmp_path / "baidu" / "ERNIE-4.5-0.3B-Paddle").symlink_to(tiny_paddle)
    assert resolve_model(REPO, download=False) == tiny_paddle  # ./baidu/ERNIE-4.5-0.3B-Paddle exists


@pytest.mark.parametrize("spec", ["/no/such/folder", "just-a-name", "a/b/c", "../x/y"])
def test_neither_a_folder_nor_a_hub_id(spec):
    with pytest.raises(ModelNotFoundError, match="model folder not found: .* or a hub id ORG/NAME"):
        resolve_model(spec)
