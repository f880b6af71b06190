"""`lora-engine` command line. Each subcommand lives in its own module exposing
``register(subparsers)``; this file only assembles them, and turns a missing optional package into one
line naming the extra to install (:mod:`lora_engine.extras`)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ... import extras

# Module names under lora_engine.apps.cli, one per subcommand (order = order in --help).
COMMANDS = [
    "inspect_cmd",
    "parse_cmd",
    "list_cmd",
    "demo_cmd",
    "train_cmd",
    "merge_cmd",
    "resize_cmd",
    "extract_cmd",
    "convert_cmd",
    "bake_cmd",
    "serve_cmd",
    "generate_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-engine", description="LoRA engine for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    line = extras.check(args.command)
    if line is None:
        try:
            return int(args.func(args) or 0)
        except ModuleNotFoundError as e:
            line = extras.missing_line(args.command, e.name)
            if line is None:
                raise
    print(line, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
