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

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"


@dataclass
class ModelConfig:
    name: str = "ernie"
    path: str = "???"
    # When set and `path` holds no checkpoint yet, `python -m fdkit.tiny` writes one there first.
    tiny_preset: str | None = None
    tiny_layout: str = "paddle"
    tiny_seed: int = 0
    reasoning_parser: str | None = None  # "ernie-45-vl" / "ernie-x1" for models that think


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
    # tensor parallelism (tp > 1): where rank 0's collective endpoint listens; dist_port null = free ports
    dist_host: str = "127.0.0.1"
    dist_port: int | None = None
    rank_start_timeout_s: float = 600.0


@dataclass
class SamplingConfig:
    """Server-side defaults for what a request leaves out (None: the model's generation_config.json,
    else OpenAI's default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # caps the default "rest of max_model_len" and any requested value
    min_tokens: int = 0
    seed: int | None = None
    reasoning_max_tokens: int | None = None


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8188
    served_model_name: str | None = None  # None: the model's name
    api_keys: list[str] = field(default_factory=list)  # FDKIT_API_KEY adds comma-separated keys
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    max_concurrency: int = 512
    max_request_bytes: int = 4 * 2**20
    max_stop_strings: int = 16
    max_stop_string_len: int = 256
    strict_model_name: bool = False
    reasoning_parser: str | None = None
    shutdown_grace_s: float = 30.0
    log_level: str = "info"


@dataclass
class PlaygroundConfig:
    enabled: bool = True
    path: str = "/playground"  # mounted on the API's port ...
    port: int | None = None  # ... or served on its own port when set
    base_url: str | None = None  # None: this server's API; any OpenAI-compatible URL works
    max_tokens: int = 512  # where the max_tokens slider starts


@dataclass
class FdkitConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    playground: PlaygroundConfig = field(default_factory=PlaygroundConfig)
    tp: int = 1


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=FdkitConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="engine", name="base_engine", node=EngineConfig)
    cs.store(group="sampling", name="base_sampling", node=SamplingConfig)
    cs.store(group="server", name="base_server", node=ServerConfig)
    cs.store(group="playground", name="base_playground", node=PlaygroundConfig)


register_configs()
# `${fdkit_dir:}` in conf/ points into the installed package (the embedded demo checkpoint lives there).
OmegaConf.register_new_resolver("fdkit_dir", lambda: str(PACKAGE_DIR), replace=True)


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
