"""`python -m engines COMMAND`: the headless face of the playground.

Subcommands live in engines/cli/, one module each with `add_arguments(parser)` and
`run(args) -> int`, imported only when chosen so that `--help` and `list` stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from engines.protocol import EngineError

COMMANDS = {
    "list": ("engines.cli.list_engines", "list every variant, available or not, and why"),
    "generate": ("engines.cli.generate", "stream one prompt through one engine, then print its stats"),
    "bench": ("engines.cli.bench", "benchmark engines: speed, memory, roofline and quality tables and plots"),
    "load": ("engines.cli.load", "N simultaneous requests against one engine: aggregate tok/s, TTFT, peak KV"),
    "kv": ("engines.cli.kv", "KV-cache size per token and per context, and how many tokens fit in memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
