"""`lora-engine serve --lora-dir DIR… [--model demo] [--port N]`: the standalone web UI (gradio):
Library, Tools, Train, Generate. Needs the ``ui`` extra; binds to 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import os
import sys

from .tool_common import add_threads, uses_demo

DEFAULT_DIR = "loras"  # in the current folder, created when no --lora-dir is given


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the web UI (library, tools, training, weight-sweep grids)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="LoRA folder (repeatable; default: ./loras, created)")
    p.add_argument("--output-dir", metavar="DIR", help="where tools write (default: the first --lora-dir)")
    p.add_argument("--model", metavar="MODEL", help="model for the Generate page: 'demo' or a demo base file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--no-hash", action="store_true", help="do not hash files while scanning (faster first scan)")
    add_threads(p, small_model=uses_demo("model"))
    p.set_defaults(func=run)


def run(args) -> int:
    from ...errors import LoraEngineError

    try:
        from ..ui.app import serve
        from ..ui.context import UiConfig

        dirs = tuple(args.lora_dir) or (DEFAULT_DIR,)
        if not args.lora_dir:
            os.makedirs(DEFAULT_DIR, exist_ok=True)
        config = UiConfig(dirs, args.output_dir, args.model, hash_files=not args.no_hash)
        print(f"lora-engine serve: http://{args.host}:{args.port}  (LoRA folders: {', '.join(dirs)})", flush=True)
        serve(config, args.host, args.port, block=True)
    except LoraEngineError as e:
        print(f"lora-engine serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
