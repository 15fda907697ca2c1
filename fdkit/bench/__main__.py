from __future__ import annotations

import argparse

from fdkit.bench import long_context, offline, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fdkit.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    offline.add_arguments(commands.add_parser("offline", help="the engine in-process, no server"))
    long_context.add_arguments(commands.add_parser("long", help="long prompts: TTFT, RSS, prefix, stalls"))
    serve.add_arguments(commands.add_parser("serve", help="any OpenAI-compatible server, over HTTP"))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
