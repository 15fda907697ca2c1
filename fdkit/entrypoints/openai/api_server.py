"""FastDeploy's command line, for existing scripts:

    python -m fdkit.entrypoints.openai.api_server --model PATH --port 8188 --tensor-parallel-size 1 \\
        --max-model-len 32768

Each flag becomes a Hydra override of fdkit's config, then the same `run(cfg)` as `launch.py` serves it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# FastDeploy flag -> fdkit config key
FLAG_TO_KEY = {
    "port": "server.port",
    "host": "server.host",
    "tensor_parallel_size": "tp",
    "max_model_len": "engine.max_model_len",
    "max_num_seqs": "engine.max_num_seqs",
    "max_num_batched_tokens": "engine.max_num_batched_tokens",
    "block_size": "engine.block_size",
    "dtype": "engine.dtype",
    "device": "engine.device",
    "seed": "engine.seed",
    "kv_cache_gib": "engine.kv_cache_gib",
    "served_model_name": "server.served_model_name",
    "reasoning_parser": "server.reasoning_parser",
    "max_concurrency": "server.max_concurrency",
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description="fdkit's FastDeploy-compatible OpenAI server")
    parser.add_argument("--model", required=True, help="checkpoint folder")
    for flag in FLAG_TO_KEY:
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None)
    parser.add_argument("--api-key", action="append", default=None, help="repeatable")
    parser.add_argument("--override", action="append", default=[], help="any fdkit override, e.g. tp=2")
    return parser.parse_known_args(argv)


def to_overrides(args: argparse.Namespace) -> list[str]:
    path = Path(args.model).expanduser()
    overrides = ["model=ernie", f"model.path={path}", f"model.name={path.name}"]
    overrides += [
        f"{key}={getattr(args, flag)}" for flag, key in FLAG_TO_KEY.items() if getattr(args, flag) is not None
    ]
    if args.api_key:
        overrides.append("server.api_keys=[" + ",".join(args.api_key) + "]")
    return overrides + list(args.override)


def main(argv: list[str] | None = None) -> None:
    import logging

    from fdkit.config import load_config
    from fdkit.launch import run

    args, unknown = parse_args(argv)
    if unknown:
        logging.getLogger("fdkit").warning(
            "ignoring FastDeploy flags fdkit does not map: %s", " ".join(unknown)
        )
    run(load_config(to_overrides(args)))


if __name__ == "__main__":
    main()
