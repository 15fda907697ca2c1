"""`run(cfg)`: build the engine from a composed config and serve it. `launch.py` and `fdkit serve`
are its Hydra fronts."""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from fdkit.config import FdkitConfig, to_config

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fdkit.engine.async_engine import AsyncLLM

logger = logging.getLogger("fdkit")


def build_engine(cfg: FdkitConfig) -> AsyncLLM:
    from fdkit.engine.async_engine import AsyncLLM
    from fdkit.engine.llm import LLM

    return AsyncLLM(LLM(config=cfg))


def run(cfg: DictConfig | FdkitConfig) -> None:
    import uvicorn

    from fdkit.serving.openai_app import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = to_config(cfg)
    logger.info("resolved config:\n%s", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    engine = build_engine(cfg)
    try:
        app = build_app(engine, cfg)
        server = cfg.server
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
        url = f"http://{host}:{server.port}"
        if cfg.playground.enabled:
            app = add_playground(app, cfg, url)
        logger.info(
            "serving %s at %s/v1 (OpenAI API), health at %s/health",
            app.state.fdkit.serving.model_name,
            url,
            url,
        )
        logger.info(
            "try: curl %s/v1/chat/completions -H 'Content-Type: application/json' "
            '-d \'{"messages": [{"role": "user", "content": "What is 4721-385?"}]}\'',
            url,
        )
        # uvicorn drains requests on SIGTERM, then re-raises it: exit cleanly, through `finally`, instead.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        uvicorn.run(
            app,
            host=server.host,
            port=server.port,
            log_level=server.log_level,
            timeout_graceful_shutdown=server.shutdown_grace_s,
        )
    finally:
        engine.shutdown()
        logger.info("engine stopped")


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def add_playground(app: FastAPI, cfg: FdkitConfig, url: str) -> FastAPI:
    """Mounts the Gradio playground on the API's port, or starts it on its own port if one is set."""
    import gradio as gr

    from fdkit.playground import build_playground

    keys = cfg.server.api_keys
    blocks = build_playground(
        base_url=cfg.playground.base_url or f"{url}/v1",
        api_key=keys[0] if keys else "null",
        max_tokens=cfg.playground.max_tokens,
    )
    if cfg.playground.port:
        blocks.launch(server_name=cfg.server.host, server_port=cfg.playground.port, prevent_thread_lock=True)
        logger.info("playground at http://127.0.0.1:%d/", cfg.playground.port)
        return app
    logger.info("playground at %s%s/", url, cfg.playground.path)
    return gr.mount_gradio_app(app, blocks, path=cfg.playground.path)
