from __future__ import annotations

import argparse

from fdkit.bench import offline, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fdkit.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    offline.add_arguments(commands.add_parser("offline", help="the engine in-process, no server"))
    serve.add_arguments(commands.add_parser("serve", help="any OpenAI-compatible server, over HTTP"))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
