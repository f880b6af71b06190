"""`lora-engine` command line. Each subcommand lives in its own module exposing
``register(subparsers)``; this file assembles them and is the one place that decides, for every
command: the torch thread count (``--threads``), what a lora-engine error prints (one line, exit 1), a
missing optional package (one line naming the extra to install, :mod:`lora_engine.extras`), Ctrl+C (one
line, exit 130) and a closed stdout pipe (``lora-engine inspect … | head``: quiet, exit 141). A command
names what a cancel leaves behind with ``set_defaults(cancelled="...")``."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
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


def _escape_unprintable() -> None:
    """Print what the console cannot encode as backslash escapes instead of raising ``UnicodeEncodeError``: a
    file name that is not valid UTF-8 (decoded with ``surrogateescape``), or non-ASCII metadata on a console
    with a narrow code page. Only strict streams change: where Python already writes such a name back as its
    original bytes (``surrogateescape``, the C locale's default), that stays."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", None) == "strict":
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot change mode: leave it
                pass


def _threads(args):
    """The thread policy for commands that take ``--threads``; nothing for the others."""
    if not hasattr(args, "threads"):
        return contextlib.nullcontext()
    from ..threads import choose_threads, torch_threads

    return torch_threads(choose_threads(args.threads, args.small_model(args)))


def _quiet_stdout() -> None:
    """The reader of stdout is gone: send the rest (and the flush at exit) nowhere."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _run(args) -> int:
    line = extras.check(args.command)
    if line is None:
        try:
            with _threads(args):
                return int(args.func(args) or 0)
        except ModuleNotFoundError as e:
            line = extras.missing_line(args.command, e.name)
            if line is None:
                raise
    print(line, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    from ...errors import LoraEngineError

    _escape_unprintable()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("\nlora-engine: cancelled", file=sys.stderr)
        return 130
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return _run(args)
    except KeyboardInterrupt:
        left = getattr(args, "cancelled", "")
        print(f"\nlora-engine {args.command}: cancelled" + (f"; {left}" if left else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a program the pipe closed on
    except LoraEngineError as e:
        print(f"lora-engine {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
