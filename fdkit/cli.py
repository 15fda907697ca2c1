"""The `fdkit` command: `fdkit serve [overrides]` is `python launch.py [overrides]`, as `vllm serve` is
to vLLM. Hydra's own flags (`--help`, `--cfg job`) work after `serve`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fdkit.config import register_configs

USAGE = "usage: fdkit serve [key=value ...]   (Hydra overrides, e.g. model=ernie tp=2 server.port=8000)"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def serve(cfg: DictConfig) -> None:
    from fdkit.launch import run

    run(cfg)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "serve":
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    register_configs()
    sys.argv = ["fdkit serve", *argv[1:]]
    serve()


if __name__ == "__main__":
    main()
