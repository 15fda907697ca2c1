"""Typed config: the dataclass schemas (registered in Hydra's ConfigStore) and `load_config`.

The YAML files in `fdkit/conf/` pick values; these dataclasses say what may be set, of what type, and
the defaults. A composed config becomes an `FdkitConfig` once (`to_config`); typed objects go down.
No paddle import here: composing a config must stay cheap.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"


@dataclass
class ModelConfig:
    name: str = "ernie"  # served as this name unless server.served_model_name is set
    path: str = "???"  # the checkpoint folder, as published
    reasoning_parser: str | None = None  # "ernie-45-vl" / "ernie-x1" for models that think
    tool_parser: str | None = None  # "ernie-x1": <tool_call> JSON in the answer becomes message.tool_calls
    download: bool = True  # a hub id (ORG/NAME) found nowhere locally is downloaded (fdkit/hub.py)
    revision: str | None = None  # the hub revision to download (None: the default branch)
    always_thinks: bool = (
        False  # True: enable_thinking cannot be switched off (the Thinking model, as FastDeploy)
    )


@dataclass
class EngineConfig:
    device: str = "cpu"  # "cpu", "gpu" or "gpu:N"
    dtype: str = "float32"  # "bfloat16": on CPU compiled, with avx512_bf16 or AMX; "float16": GPU only
    compile: bool = True  # CPU: dense parts run as Paddle Inference programs (oneDNN); False: dygraph
    compile_cache_dir: str | None = "~/.cache/fdkit/compiled"  # compiled programs kept; None: none kept
    # CPU: attention runs fdkit's C++ kernel (fdkit/kernels, built on first use into compile_cache_dir),
    # reading the paged cache in place, and so do norms, RoPE, SiLU and cache writes; False: paddle's ops
    attention_kernel: bool = True
    # CPU, with compile: linear layers run oneDNN's matmul on weights packed at load (kernels/linear.cc),
    # the rest in dygraph; False (or no compiler): the dense parts run as Paddle Inference programs
    linear_kernel: bool = True
    threads: int = 0  # 0: the host's cores shared among the ranks
    block_size: int = 64  # tokens per KV block
    kv_cache_gib: float | None = None  # KV cache of one rank; None: sized from memory (memory_utilization)
    memory_utilization: float | None = None  # KV share of memory left after weights; None: 0.5 CPU / 0.9 GPU
    num_kv_blocks: int | None = None  # overrides kv_cache_gib and the auto size when set
    max_num_seqs: int = 32  # sequences per step
    max_num_batched_tokens: int | None = None  # tokens per step (prompts are prefilled in chunks); None: 2048
    # with decodes running, a step with prompt chunks takes at most this x a decode-only step; None/0: off
    max_decode_stall: float | None = 2.0
    # sequences of at most this many tokens prefill whole next to decodes, not held to max_decode_stall
    # (as vLLM and FastDeploy schedule every prompt); 0: every prompt is held to it
    short_prompt_tokens: int = 256
    # None: the model's max_position_embeddings, lowered to what the KV cache holds (logged)
    max_model_len: int | None = None
    enable_prefix_caching: bool = True  # reuse the KV of full blocks of prompts seen before
    seed: int = 0  # unseeded requests draw from this seed, reproducibly
    show_progress: bool = True  # a progress bar while the weights load
    # rank processes (tp > 1): where rank 0's collective endpoint listens; dist_port None picks free
    # ports, so a second engine on the host never collides
    dist_host: str = "127.0.0.1"
    dist_port: int | None = None
    rank_start_timeout_s: float = 600.0  # ranks that are not ready by then fail the start
    # several hosts (tp ranks split evenly over nnodes): node 0 runs the server and ranks 0..tp/nnodes-1,
    # node k runs `fdkit rank ... engine.node_rank=k` (paddle.distributed.launch's --nnodes / --rank)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None  # node 0's address the other nodes reach (paddle's --master host)
    master_port: int = 8790  # node 0's control port, where the other nodes join (open it between hosts)
    dist_secret: str | None = None  # shared by every node (conf: ${oc.env:FDKIT_DIST_SECRET}); never sent
    dist_ifname: str | None = None  # the collectives' network interface; None: the one of the node's address
    expert_parallel: bool = False  # tp > 1, MoE: each rank holds 1/tp of the routed experts whole
    grammar_cache_size: int = 64  # guided decoding: compiled grammars kept (LRU, keyed by grammar text)


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
    metrics_port: int | None = None  # /metrics on its own port (FastDeploy's --metrics-port); None: `port`
    served_model_name: str | None = None  # None: model.name
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    max_concurrency: int = 512  # requests in flight; more get 429
    max_request_bytes: int = 4 * 2**20
    max_stop_strings: int = 16
    max_stop_string_len: int = 256
    max_prompts_per_request: int = 64  # /v1/completions prompts in one request; more get 400
    # a request's own chat_template runs code of the client's on this server (a template can loop for
    # long): off by default, as vLLM's --trust-request-chat-template
    allow_request_chat_template: bool = False
    public_paths: list[str] = field(default_factory=list)  # open without an API key (/health always is)
    strict_model_name: bool = False  # True: a request naming another model gets 404
    reasoning_parser: str | None = None
    shutdown_grace_s: float = 30.0  # SIGTERM: how long running requests may finish
    log_level: str = "info"
    on_engine_death: str = "restart"  # "restart": start a new engine; "exit": stop the server (non-zero)
    max_engine_restarts: int = 5  # engine start attempts over the server's life; then as "exit"
    restart_backoff_s: float = 1.0  # wait before a restart attempt; doubles after each failed one


@dataclass
class PlaygroundConfig:
    enabled: bool = True
    path: str = "/playground"  # mounted on the API's port ...
    port: int | None = None  # ... or served on its own port when set
    base_url: str | None = None  # None: this server's API; any OpenAI-compatible URL works
    max_tokens: int = 512  # where the max_tokens slider starts
    demo_tools: bool = False  # offer the demo's multiply tool, run its calls, go on (ernie_demo: true)


@dataclass
class FdkitConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    playground: PlaygroundConfig = field(default_factory=PlaygroundConfig)
    tp: int = 1
    dp: int = 1


def register_configs() -> None:
    """Schemas in Hydra's ConfigStore, and the resolvers `fdkit/conf/` uses."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=FdkitConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="engine", name="base_engine", node=EngineConfig)
    cs.store(group="sampling", name="base_sampling", node=SamplingConfig)
    cs.store(group="server", name="base_server", node=ServerConfig)
    cs.store(group="playground", name="base_playground", node=PlaygroundConfig)
    OmegaConf.register_new_resolver("fdkit_dir", lambda: str(PACKAGE_DIR), replace=True)
    OmegaConf.register_new_resolver("comma_list", _comma_list, replace=True)
    OmegaConf.register_new_resolver("tiny_checkpoint", _tiny_checkpoint, replace=True)


def _comma_list(text: str) -> list[str]:
    """ "a, b" -> ["a", "b"]; "" -> []."""
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _tiny_checkpoint(path: str, preset: str = "tiny", layout: str = "paddle", seed: int = 0) -> str:
    """A random-weight checkpoint at `path`, written there by `fdkit.tiny` the first time it is asked for."""
    from fdkit.tiny import ensure_checkpoint

    return str(ensure_checkpoint(resolve_path(path), preset, layout, int(seed)))


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> FdkitConfig:
    """Compose `fdkit/conf/` with the command line's override strings, e.g. ["model=ernie", "tp=2"]."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()  # a notebook may compose many times
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return to_config(cfg)


def to_config(cfg: DictConfig | FdkitConfig | dict) -> FdkitConfig:
    """The typed config of a composed DictConfig (resolved once), or of a plain dict of one."""
    if isinstance(cfg, FdkitConfig):
        return cfg
    if isinstance(cfg, dict):
        cfg = OmegaConf.merge(OmegaConf.structured(FdkitConfig), cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def to_dict(cfg: FdkitConfig) -> dict:
    """Plain values, for a message to another process."""
    return dataclasses.asdict(cfg)


def to_overrides(values: dict[str, Any], prefix: str = "") -> list[str]:
    """{"block_size": 16} with prefix "engine" -> ["engine.block_size=16"] (None becomes null)."""
    items = []
    for key, value in values.items():
        text = "null" if value is None else str(value)
        items.append(f"{prefix + '.' if prefix else ''}{key}={text}")
    return items


def resolve_path(path: str | Path) -> Path:
    return Path(os.path.expanduser(path)).resolve()
