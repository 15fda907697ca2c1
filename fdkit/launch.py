"""`run(cfg)`: build the engine from a composed config and serve it. `launch.py` and `fdkit serve`
are its Hydra fronts. With `engine.node_rank` > 0 (`fdkit rank`) it runs instead that node's ranks of
a multi-host engine, for node 0's server (`run_node`).

SIGTERM (or Ctrl-C) drains: the server stops admitting (503s, /health 503, the port stays open so they
are answered), lets running requests finish within `server.shutdown_grace_s`, ends the rest with an
error event, then stops and exits 0. A second signal stops at once. An engine that died for good
(`server.on_engine_death: exit`, or its restarts used up) stops the server with exit status 1.

A server that cannot start as configured says why in one line and exits with status 1, before any
weight is read: a port in use, a model that is not there, a config the memory plan refuses (too big,
a dtype the device cannot run), a checkpoint fdkit cannot load.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from typing import TYPE_CHECKING

import uvicorn
from omegaconf import DictConfig, OmegaConf

from fdkit.checkpoint import CheckpointError, CheckpointReader
from fdkit.config import FdkitConfig, to_config
from fdkit.engine.rank_nodes import ClusterError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fdkit.engine.async_engine import AsyncLLM
    from fdkit.engine.replicas import ReplicaSet

logger = logging.getLogger("fdkit")
FLUSH_S = 5.0  # after the drain: how long uvicorn waits for connections to close
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StartupError(RuntimeError):
    """The server cannot start as configured (e.g. its port is in use)."""


# one line and exit status 1, no traceback: a port in use, a model or tokenizer not found
# (ModelNotFoundError is a FileNotFoundError), a checkpoint that cannot load, the memory plan's PlanError,
# nodes that cannot form the engine
STARTUP_ERRORS = (StartupError, FileNotFoundError, CheckpointError, ClusterError)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a model download's every request otherwise


def build_engine(cfg: FdkitConfig, on_fatal=None) -> AsyncLLM | ReplicaSet:
    """The engine in its own process (a crash there cannot take the server down), supervised; `dp`
    replicas of it behind one front when dp > 1."""
    from fdkit.engine.replicas import ReplicaSet

    if cfg.dp < 1:
        raise StartupError(f"dp={cfg.dp}: the number of engine replicas must be at least 1")
    if cfg.dp > 1:
        return ReplicaSet(cfg, _supervised_engine, on_fatal)
    return _supervised_engine(cfg, on_fatal)


def _supervised_engine(cfg: FdkitConfig, on_fatal=None) -> AsyncLLM:
    from fdkit.engine.async_engine import AsyncLLM
    from fdkit.llm import LLM

    return AsyncLLM(LLM(config=cfg, in_process=False), on_fatal=on_fatal)


def _loggable(cfg: FdkitConfig) -> str:
    """The config as YAML, API keys and the nodes' secret masked."""
    shown = OmegaConf.structured(cfg)
    shown.server.api_keys = ["***"] * len(cfg.server.api_keys)
    if cfg.engine.dist_secret:
        shown.engine.dist_secret = "***"
    return OmegaConf.to_yaml(shown)


def run(cfg: DictConfig | FdkitConfig) -> None:
    configure_logging()
    cfg = to_config(cfg)
    if cfg.engine.node_rank > 0:
        run_node(cfg)
        return
    logger.info("resolved config:\n%s", _loggable(cfg))
    engine_died = threading.Event()

    def on_fatal(reason: str) -> None:
        logger.error("the engine died and will not be restarted: %s", reason)
        engine_died.set()

    try:
        check_ports_free(cfg)
        engine = build_engine(cfg, on_fatal)
    except STARTUP_ERRORS as exc:
        logger.error("cannot start: %s", " ".join(str(exc).split()))
        raise SystemExit(1) from None
    server = None
    try:
        server = _make_server(engine, cfg, engine_died)
        server.run()
    finally:
        if server is not None and server.metrics_server is not None:
            server.metrics_server.should_exit = True
        engine.shutdown()
        logger.info("engine stopped")
    if server.exit_code:
        raise SystemExit(server.exit_code)


def run_node(cfg: FdkitConfig) -> None:
    """Node K > 0 of a multi-host engine: runs this node's ranks of each engine node 0's server starts,
    until node 0 stays away; a config that cannot work, or a node 0 out of reach, is one line, status 1."""
    from fdkit.engine.rank_agent import serve_node
    from fdkit.hub import resolve_model

    model = cfg.model
    try:
        path = resolve_model(model.path, model.download, model.revision)
        CheckpointReader(path)  # the weight files are all there, before node 0 counts on this node
        serve_node(cfg, path)
    except STARTUP_ERRORS as exc:
        logger.error("node %d stops: %s", cfg.engine.node_rank, " ".join(str(exc).split()))
        raise SystemExit(1) from None


def check_ports_free(cfg: FdkitConfig) -> None:
    """Before the model loads: every port the server will listen on must be free."""
    ports = {
        "server.port (--port)": cfg.server.port,
        "server.metrics_port (--metrics-port)": cfg.server.metrics_port,
        "playground.port": cfg.playground.port if cfg.playground.enabled else None,
    }
    for key, port in ports.items():
        if not port:
            continue
        family = socket.AF_INET6 if ":" in cfg.server.host else socket.AF_INET
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                sock.bind((cfg.server.host, port))
            except OSError as exc:
                raise StartupError(
                    f"port {port} on {cfg.server.host} is not free ({exc.strerror}): stop what listens "
                    f"there or choose another port: {key}"
                ) from exc


def _make_server(engine: AsyncLLM, cfg: FdkitConfig, engine_died: threading.Event) -> DrainingServer:
    from fdkit.serving.openai_app import build_app

    app = build_app(engine, cfg)
    state = app.state.fdkit
    server = cfg.server
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    url = f"http://{host}:{server.port}"
    if cfg.playground.enabled:
        app = add_playground(app, cfg, url)
    logger.info("serving %s at %s/v1 (OpenAI API), health at %s/health", state.serving.model_name, url, url)
    logger.info(
        "try: curl %s/v1/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"messages": [{"role": "user", "content": "What is 4721-385?"}]}\'',
        url,
    )
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        timeout_graceful_shutdown=FLUSH_S,
    )
    draining = DrainingServer(config, state, server.shutdown_grace_s, engine_died)
    draining.metrics_server = start_metrics_server(state, cfg)
    return draining


def start_metrics_server(state, cfg: FdkitConfig) -> uvicorn.Server | None:
    """/metrics on `server.metrics_port`, in a thread, when it differs from the API's port."""
    port = cfg.server.metrics_port
    if port in (None, cfg.server.port):
        return None
    from fdkit.serving.openai_app import build_metrics_app

    app = build_metrics_app(state, cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.server.host, port=port, log_level="warning"))
    threading.Thread(target=server.run, name="fdkit-metrics", daemon=True).start()
    logger.info("metrics at http://%s:%d/metrics", cfg.server.host, port)
    return server


class DrainingServer(uvicorn.Server):
    """uvicorn's server with fdkit's signal handling: drain first, then stop."""

    def __init__(self, config, state, grace_s: float, engine_died: threading.Event):
        super().__init__(config)
        self.state, self.grace_s, self.engine_died = state, grace_s, engine_died
        self.exit_code = 0
        self.metrics_server: uvicorn.Server | None = None
        self.drain_requested = False
        self._drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame) -> None:
        if self.drain_requested:
            logger.warning("second %s: stopping now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
        else:
            logger.info("%s: draining, then stopping", signal.Signals(sig).name)
            self.drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        if self.engine_died.is_set() and not self.exit_code:
            self.exit_code, self.should_exit = 1, True
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        await self.state.drain(self.grace_s)
        self.should_exit = True


def add_playground(app: FastAPI, cfg: FdkitConfig, url: str) -> FastAPI:
    """Mounts the Gradio playground on the API's port, or starts it on its own port if one is set."""
    import gradio as gr

    from fdkit.playground import build_playground

    keys = cfg.server.api_keys
    blocks = build_playground(
        base_url=cfg.playground.base_url or f"{url}/v1",
        api_key=keys[0] if keys else "null",
        max_tokens=cfg.playground.max_tokens,
        demo_tools=cfg.playground.demo_tools,
    )
    if cfg.playground.port:
        blocks.launch(server_name=cfg.server.host, server_port=cfg.playground.port, prevent_thread_lock=True)
        logger.info("playground at http://127.0.0.1:%d/", cfg.playground.port)
        return app
    logger.info("playground at %s%s/", url, cfg.playground.path)
    return gr.mount_gradio_app(app, blocks, path=cfg.playground.path)
