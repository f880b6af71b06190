"""What the subcommands share: a progress bar (tqdm when installed, else a plain counter on stderr), dtype
names, ``--threads`` and the overwrite rule. Errors and Ctrl+C are main()'s."""
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


def add_threads(p, small_model=None) -> None:
    """``--threads N``; main() applies it (see :mod:`lora_engine.apps.threads`). ``small_model(args)`` says
    whether the command runs the demo model, which gets one thread by default."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the physical cores other processes leave free, 1 on a busy "
                   "machine or for the demo model; OMP_NUM_THREADS, when set, is the default)")
    p.set_defaults(small_model=small_model or (lambda args: False))


def uses_demo(attr: str):
    """A ``small_model`` test for :func:`add_threads`: does ``args.<attr>`` name the demo model?"""
    def check(args) -> bool:
        from ..demo.base import is_demo_base

        return is_demo_base(getattr(args, attr, None))
    return check


def add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def claim_output(path: str | None, overwrite: bool) -> None:
    """The rule of every writing command: an existing output is replaced only with ``--overwrite``."""
    import os

    from ...errors import OutputExistsError

    if path and os.path.lexists(path) and not overwrite:
        raise OutputExistsError(path)


SVD_METHODS = ["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]


def add_svd_method(p, param_help: str = "parameter of the dynamic method") -> None:
    """``--method``/``--param`` of the commands that factor by SVD (merge, resize, extract)."""
    p.add_argument("--method", default="fixed", choices=SVD_METHODS)
    p.add_argument("--param", type=float, help=param_help)


def add_writer_options(p, precision_default: str) -> None:
    """What every command that writes a LoRA takes: precision, ``--overwrite``, ``--quiet``, device, threads;
    a cancel leaves nothing written."""
    add_precision(p, precision_default)
    add_overwrite(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar (and no per-module lines)")
    add_device(p)
    add_threads(p)
    p.set_defaults(cancelled="nothing written")
