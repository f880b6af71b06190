"""`lora-engine serve [--lora-dir DIR…] [--model demo|FILE] [--auth USER:PASS] [--port N]`: the standalone
web UI (gradio): Library, Tools, Train, Generate. Needs the ``ui`` extra; binds to 127.0.0.1 unless told
otherwise.

With no arguments it serves the demo: the built-in demo model and ``./demo_out`` (where ``lora-engine
demo`` writes its LoRA) as the LoRA and output folder. The browser reads and writes only inside the
configured folders (LoRA folders, output folder, ``--model-dir``, ``--dataset-dir``) and never
replaces an existing file unless ``--allow-overwrite`` is given.
"""
from __future__ import annotations

import ipaddress
import os
import sys

from .tool_common import add_threads, uses_demo

DEFAULT_DIR = "demo_out"  # ``lora-engine demo``'s default output folder; created when no --lora-dir is given
DEFAULT_DATASETS = "datasets"
AUTH_ENV = "LORA_ENGINE_AUTH"


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the web UI (library, tools, training, weight-sweep grids)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help=f"LoRA folder (repeatable; default: ./{DEFAULT_DIR}, created)")
    p.add_argument("--output-dir", metavar="DIR", help="where tools and training write (default: the first --lora-dir)")
    p.add_argument("--model", metavar="MODEL", default="demo",
                   help="model for the Generate page and previews: 'demo' (default, built in) or a demo base file")
    p.add_argument("--model-dir", action="append", default=[], metavar="DIR",
                   help="folder of checkpoints the Tools and Train pages may read (repeatable)")
    p.add_argument("--dataset-dir", action="append", default=[], metavar="DIR",
                   help=f"folder of training image folders (repeatable; default: ./{DEFAULT_DATASETS})")
    p.add_argument("--allow-overwrite", action="store_true",
                   help="let the browser replace existing files in the output folder (off: never)")
    p.add_argument("--auth", metavar="USER:PASS",
                   help=f"require this login (default: ${AUTH_ENV} when set, which keeps it out of the process list)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--no-hash", action="store_true", help="do not hash files while scanning (faster first scan)")
    add_threads(p, small_model=uses_demo("model"))
    p.set_defaults(func=run)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        from ...errors import LoraEngineError

        raise LoraEngineError("--auth must be USER:PASSWORD (both non-empty)")
    return user, password


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, auth) -> str | None:
    """The line printed when the server listens beyond this machine without a login."""
    if auth is not None or is_loopback(host):
        return None
    return (f"lora-engine serve: warning: bound to {host} without --auth: anyone who can reach this address can "
            "use the UI (read the library, write to the output folder, train)")


def config_from_args(args):
    from ..ui.context import UiConfig

    dirs = tuple(args.lora_dir) or (DEFAULT_DIR,)
    if not args.lora_dir:
        os.makedirs(DEFAULT_DIR, exist_ok=True)
    return UiConfig(tuple(os.path.abspath(d) for d in dirs), args.output_dir and os.path.abspath(args.output_dir),
                    args.model, hash_files=not args.no_hash,
                    model_dirs=tuple(os.path.abspath(d) for d in args.model_dir),
                    dataset_dirs=tuple(os.path.abspath(d) for d in (args.dataset_dir or [DEFAULT_DATASETS])),
                    allow_overwrite=args.allow_overwrite)


def run(args) -> int:
    from ...errors import LoraEngineError

    try:
        from ..ui.app import serve

        auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
        config = config_from_args(args)
        warning = exposure_warning(args.host, auth)
        if warning:
            print(warning, file=sys.stderr)
        print(f"lora-engine serve: starting (LoRA folders: {', '.join(config.lora_dirs)}; model: {config.model})",
              flush=True)
        serve(config, args.host, args.port, block=True, auth=auth,
              on_started=lambda url: print(f"lora-engine serve: {url}", flush=True))
    except LoraEngineError as e:
        print(f"lora-engine serve: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"lora-engine serve: cannot start the server: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
