"""FastDeploy's command line, for existing scripts, verbatim:

    python -m fdkit.entrypoints.openai.api_server --model baidu/ERNIE-4.5-0.3B-Paddle --port 8188 \\
        --tensor-parallel-size 8 --max-model-len 32768

`--model` takes a folder or a hub id (found locally or downloaded: fdkit/hub.py). Every FastDeploy flag
is mapped onto fdkit's config or accepted with a warning that says why it has no effect
(fastdeploy_flags.py; the table is docs/fastdeploy_flags.md); `--config FILE.yaml` reads flags from a
file as FastDeploy does (the command line wins); other fdkit settings go in `--override key=value`.
Then the same `run(cfg)` as `launch.py` serves it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import socket
import sys
from pathlib import Path

from fdkit.entrypoints.openai.fastdeploy_flags import (
    ALIASES,
    LIST,
    MAPPED,
    MAPPED_SWITCHES,
    SWITCH,
    TEXT,
    TOGGLE,
    VALUE,
    ignored_flags,
)

logger = logging.getLogger("fdkit")
ARGPARSE_KIND = {
    VALUE: {},
    SWITCH: {"action": "store_true"},
    TOGGLE: {"action": argparse.BooleanOptionalAction},
    LIST: {"nargs": "+"},
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="fdkit's FastDeploy-compatible OpenAI server", allow_abbrev=False
    )
    parser.add_argument("--model", required=True, help="checkpoint folder, or hub id ORG/NAME")
    for flag, key in MAPPED.items():
        names = [flag, *(alias for alias, target in ALIASES.items() if target == flag)]
        parser.add_argument(*names, dest=_dest(flag), default=None, help=f"sets {key}")
    for flag, key in MAPPED_SWITCHES.items():
        parser.add_argument(flag, dest=_dest(flag), action="store_true", help=f"sets {key}=true")
    for flag, (kind, reason) in ignored_flags().items():
        help_text = f"no effect: {reason}".replace("%", "%%")
        parser.add_argument(flag, dest=_dest(flag), default=None, help=help_text, **ARGPARSE_KIND[kind])
    parser.add_argument("--api-key", action="append", default=None, help="repeatable")
    parser.add_argument("--ips", default=None, help="the nodes' addresses A,B,...; the first is the master")
    parser.add_argument(
        "--config", default=None, help="YAML file of flags (FastDeploy's); the command line wins"
    )
    parser.add_argument("--override", action="append", default=[], help="any fdkit override, e.g. tp=2")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    config = first.parse_known_args(argv)[0].config
    if config:  # the file's flags first, so that the command line's win (--model may be in the file)
        argv = config_file_argv(Path(config)) + argv
    return build_parser().parse_args(argv)


def config_file_argv(path: Path) -> list[str]:
    """FastDeploy's `--config` YAML ({max_model_len: 32768, enable_logprob: true}) as flags."""
    import yaml

    argv: list[str] = []
    for key, value in (yaml.safe_load(path.read_text()) or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, value if isinstance(value, str) else json.dumps(value)]
    return argv


def ignored_warnings(args: argparse.Namespace) -> list[str]:
    return [
        f"{flag} is accepted but has no effect ({reason})"
        for flag, (_, reason) in ignored_flags().items()
        if getattr(args, _dest(flag)) is not None  # --no-enable-prefix-caching too
    ]


def to_overrides(args: argparse.Namespace) -> list[str]:
    """The flags that are numbers or switches, as Hydra overrides (free text goes in `set_text_flags`)."""
    overrides = ["model=ernie"]
    for flag, key in MAPPED.items():
        value = getattr(args, _dest(flag))
        if value is not None and flag not in TEXT:
            overrides.append(f"{key}={value}")
    overrides += [f"{key}=true" for flag, key in MAPPED_SWITCHES.items() if getattr(args, _dest(flag))]
    if args.reasoning_parser == "ernie-x1":  # FastDeploy forces thinking on for this parser
        overrides.append("model.always_thinks=true")
    return overrides + list(args.override)


def text_flags(args: argparse.Namespace) -> dict[str, object]:
    """config key -> value of the free-text flags (api keys, paths, names), which Hydra would parse."""
    model = Path(args.model).expanduser()  # a folder, or a hub id ORG/NAME (its NAME is the served name)
    values: dict[str, object] = {"model.path": str(model), "model.name": model.name}
    values |= {MAPPED[flag]: getattr(args, _dest(flag)) for flag in TEXT}
    values["server.api_keys"] = list(args.api_key) if args.api_key else None
    return {key: value for key, value in values.items() if value is not None}


def set_text_flags(cfg, args: argparse.Namespace):
    """Sets the free-text flags on the typed config `cfg`, except a key an --override sets (it wins)."""
    overridden = {item.partition("=")[0].lstrip("+~") for item in args.override}
    values = text_flags(args) | (node_flags(args.ips) if args.ips else {})
    for key, value in values.items():
        if key not in overridden:
            section, _, name = key.rpartition(".")
            setattr(getattr(cfg, section), name, value)
    return cfg


def node_flags(ips_text: str) -> dict[str, object]:
    """FastDeploy's `--ips A,B,...`, the same command on every node: the first address is node 0 (the
    master), and this host is the node whose address it has. ValueError if it has none of them."""
    ips = [ip.strip() for ip in ips_text.split(",") if ip.strip()]
    node_rank = next((i for i, ip in enumerate(ips) if is_local_address(ip)), None)
    if node_rank is None:
        raise ValueError(f"--ips {ips_text}: none of these addresses is this host's")
    return {"engine.nnodes": len(ips), "engine.master_addr": ips[0], "engine.node_rank": node_rank}


def is_local_address(ip: str) -> bool:
    """Whether this host (its network namespace) has the address `ip`: only then can a socket bind it."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


def load_fastdeploy_config(args: argparse.Namespace):
    """The FdkitConfig of FastDeploy's parsed command line."""
    from fdkit.config import load_config

    return set_text_flags(load_config(to_overrides(args)), args)


def main(argv: list[str] | None = None) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fdkit.launch import configure_logging, run

    configure_logging()
    args = parse_args(argv)
    for warning in ignored_warnings(args):
        logger.warning("%s", warning)
    try:
        cfg = load_fastdeploy_config(args)
    except (HydraException, OmegaConfBaseException) as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""  # Hydra's message names only the override
        logger.error("cannot start: %s", " ".join(f"{exc}{cause}".split()))
        raise SystemExit(2) from None
    except ValueError as exc:  # --ips names no address of this host
        logger.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    run(cfg)


if __name__ == "__main__":
    main()
