"""The `fdkit` command: `fdkit serve [overrides]` is `python launch.py [overrides]`, as `vllm serve` is
to vLLM; `fdkit rank [overrides] engine.node_rank=K` runs node K's ranks of a multi-host engine (as
`python -m paddle.distributed.launch --rank K` would on that node; see the README's deployment page).
Hydra's own flags (`--help`, `--cfg job`) work after the command."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fdkit.config import register_configs

USAGE = (
    "usage: fdkit serve [key=value ...]   (Hydra overrides, e.g. model=ernie tp=2 server.port=8000)\n"
    "       fdkit rank [key=value ...] engine.node_rank=K   (node K > 0 of engine.nnodes hosts)"
)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def serve(cfg: DictConfig) -> None:
    from fdkit.launch import run

    run(cfg)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def rank(cfg: DictConfig) -> None:
    from fdkit.config import to_config
    from fdkit.launch import configure_logging, run_node

    configure_logging()
    run_node(to_config(cfg))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve": serve, "rank": rank}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    register_configs()
    sys.argv = [f"fdkit {argv[0]}", *argv[1:]]
    commands[argv[0]]()


if __name__ == "__main__":
    main()
