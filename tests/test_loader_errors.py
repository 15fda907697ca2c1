"""A broken checkpoint folder gets a message that says what is wrong, not a traceback from deep inside."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import TEST_ENGINE

from fdkit import LLM
from fdkit.checkpoint import INDEX_FILE, CheckpointError, CheckpointReader, SafetensorsFile, save_safetensors


@pytest.fixture
def broken(tiny_paddle, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_paddle, folder)
    return folder


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def load(folder):
    return LLM(folder, **TEST_ENGINE)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load(tmp_path / "nope")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(broken)


def test_missing_tokenizer(broken):
    (broken / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        load(broken)


def test_missing_shard(broken):
    shard = json.loads((broken / INDEX_FILE).read_text())["weight_map"]["ernie.norm.weight"]
    (broken / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names {shard}, which is missing"):
        load(broken)


def test_no_weights(broken):
    for path in broken.glob("*.safetensors*"):
        path.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        load(broken)


@pytest.mark.parametrize("changes", [{"architectures": ["LlamaForCausalLM"]}, {"model_type": "llama"}])
def test_unsupported_architecture(broken, changes):
    edit_config(broken, **changes)
    with pytest.raises(CheckpointError, match="unsupported"):
        load(broken)


def test_shape_mismatch_names_tensor_and_shapes(broken):
    edit_config(broken, intermediate_size=128)
    with pytest.raises(
        CheckpointError,
        match=r"ernie\.layers\.\d\.mlp\.\w+\.weight has shape \[\d+, \d+\] "
        r"but config.json implies \[\d+, \d+\]",
    ):
        load(broken)


def test_missing_tensor(broken):
    index = json.loads((broken / INDEX_FILE).read_text())
    shard = index["weight_map"]["ernie.layers.1.mlp.down_proj.weight"]
    file = SafetensorsFile(broken / shard)
    tensors = {
        name: np.array(file.get(name))
        for name in file.keys()
        if name != "ernie.layers.1.mlp.down_proj.weight"
    }
    del file
    save_safetensors(tensors, broken / shard)
    del index["weight_map"]["ernie.layers.1.mlp.down_proj.weight"]
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no tensor for 1.down_proj"):
        load(broken)


def test_bf16_round_trip(tmp_path):
    values = np.array([[1.0, -2.5, 3.140625, 1e-3]], dtype=np.float32)
    save_safetensors({"w": values}, tmp_path / "w.safetensors", bf16=True)
    reader = CheckpointReader(tmp_path)
    np.testing.assert_allclose(reader.get("w"), values, rtol=4e-3)
    assert SafetensorsFile(tmp_path / "w.safetensors").header["w"]["dtype"] == "BF16"


def test_kv_budget_too_small_for_max_model_len(tiny_paddle):
    with pytest.raises(CheckpointError, match="needs 32"):
        LLM(tiny_paddle, **{**TEST_ENGINE, "num_kv_blocks": 4})
