"""Typed config schemas, registered in Hydra's ConfigStore, and `load_config` for Python use.

The YAML files in `conf/` pick values; these dataclasses say what may be set and of what type.
No paddle import here: composing a config must stay cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    name: str = "ernie"
    path: str = "???"
    # When set and `path` holds no checkpoint yet, `python -m fdkit.tiny` writes one there first.
    tiny_preset: str | None = None
    tiny_layout: str = "paddle"
    tiny_seed: int = 0


@dataclass
class EngineConfig:
    device: str = "cpu"  # "cpu", "gpu" or "gpu:N"
    dtype: str = "float32"  # "bfloat16" / "float16" need a GPU build of paddle
    threads: int = 0  # 0: one per core
    block_size: int = 64
    kv_cache_gib: float = 1.0  # memory for the KV cache of one rank
    num_kv_blocks: int | None = None  # overrides kv_cache_gib when set
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # None: max(max_model_len, 2048)
    max_model_len: int | None = 4096  # None: the model's max_position_embeddings
    seed: int = 0
    show_progress: bool = True


@dataclass
class FdkitConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tp: int = 1


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=FdkitConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="engine", name="base_engine", node=EngineConfig)


register_configs()


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose `conf/` with the same override strings as the command line, e.g. ["model=ernie", "tp=2"]."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()  # a notebook may compose many times
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return cfg


def to_overrides(values: dict[str, Any], prefix: str = "") -> list[str]:
    """{"block_size": 16} with prefix "engine" -> ["engine.block_size=16"] (None becomes null)."""
    items = []
    for key, value in values.items():
        text = "null" if value is None else str(value)
        items.append(f"{prefix + '.' if prefix else ''}{key}={text}")
    return items


def resolve_path(path: str) -> Path:
    return Path(os.path.expanduser(path)).resolve()


def as_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
