"""What the tool subcommands (merge, resize, extract, convert, bake) share: a progress bar (tqdm when
installed, else a plain counter on stderr), one-line errors, Ctrl-C as a clean cancel, dtype names."""
from __future__ import annotations

import sys

DTYPES = {"fp32": "float32", "float": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def dtype_arg(name: str | None):
    """``--precision`` value -> torch dtype (None keeps the tool's default)."""
    if name is None:
        return None
    import torch

    return getattr(torch, DTYPES[name])


def add_precision(p, default_help: str) -> None:
    p.add_argument("--precision", choices=sorted(DTYPES), default=None, help=f"dtype of the output tensors ({default_help})")


def add_device(p) -> None:
    p.add_argument("--device", default=None, help="torch device for the math, e.g. cuda (default: cpu)")


class Bar:
    """``with Bar("merge") as bar: tool(..., progress=bar)``: called as ``bar(done, total, what)``."""

    def __init__(self, label: str, quiet: bool = False):
        self.label, self.quiet, self._tqdm, self._last = label, quiet, None, -1

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int, what: str) -> None:
        if self.quiet:
            return
        if self._tqdm is None and self._last < 0:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, desc=self.label, unit="it", file=sys.stderr, leave=False)
            except ImportError:
                self._tqdm = False
        if self._tqdm:
            self._tqdm.update(done - max(self._last, 0))
        elif done * 10 // max(total, 1) != self._last * 10 // max(total, 1) or done == total:
            print(f"{self.label}: {done}/{total}", file=sys.stderr, flush=True)
        self._last = done

    def __exit__(self, *exc):
        if self._tqdm:
            self._tqdm.close()
        return False


def run_tool(command: str, fn) -> int:
    """Run ``fn()``; a lora-engine error becomes one line on stderr (exit 1), Ctrl-C exit 130."""
    from ...errors import LoraEngineError

    try:
        fn()
    except LoraEngineError as e:
        print(f"lora-engine {command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lora-engine {command}: cancelled, nothing written", file=sys.stderr)
        return 130
    return 0
