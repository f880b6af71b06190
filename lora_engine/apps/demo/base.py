"""Where the demo base model comes from: the weights shipped in the package, or built once.

The shipped file ``assets/demo_base.safetensors`` was written by
``python -m lora_engine.apps.demo.train_base --out lora_engine/apps/demo/assets/demo_base.safetensors``
(defaults: 2400 steps, batch 24, seed 0, one thread). If it is missing (a trimmed install), the
same script runs once into the user cache (``$LORA_ENGINE_CACHE`` or ``~/.cache/lora-engine``) and
later runs reuse that file; the file only appears there once training finished.
"""
from __future__ import annotations

import os
from typing import Callable

from .model import FORMAT, DemoModel, load_model

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_base.safetensors")


def cache_dir() -> str:
    return os.environ.get("LORA_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora-engine")


def base_path() -> tuple[str, bool]:
    """``(path, exists)``: the shipped weights if present, else the cache location."""
    if os.path.isfile(ASSET):
        return ASSET, True
    path = os.path.join(cache_dir(), "demo_base.safetensors")
    return path, os.path.isfile(path)


def build_base(path: str, progress: Callable[[int, int, float], None] | None = None) -> None:
    """Run the base training script into ``path`` (atomically: only a finished file appears)."""
    from .train_base import _parser, train

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".building"
    args = _parser().parse_args(["--out", tmp])
    args.save_every = args.steps  # no intermediate files
    try:
        train(args, None if progress is None else (lambda step, loss: progress(step, args.steps, loss)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_demo_base(spec: str | os.PathLike | None) -> bool:
    """Whether a model argument names the demo model: ``"demo"`` (the shipped weights) or a demo base
    ``.safetensors`` file (told by its ``format`` metadata; only the header is read)."""
    if spec is None:
        return False
    spec = os.fspath(spec).strip()
    if spec == "demo":
        return True
    if not (spec.lower().endswith(".safetensors") and os.path.isfile(spec)):
        return False
    from ...errors import LoraEngineError
    from ...formats.safetensors_file import SafetensorsFile

    try:
        return (SafetensorsFile(spec).metadata or {}).get("format") == FORMAT
    except (LoraEngineError, OSError, ValueError):
        return False


def load_demo(spec: str, progress: Callable[[int, int, float], None] | None = None) -> tuple[DemoModel, str]:
    """:func:`get_base` for a model argument that :func:`is_demo_base` accepted."""
    spec = os.fspath(spec).strip()
    return get_base(None if spec == "demo" else spec, progress)


def get_base(path: str | None = None, progress: Callable[[int, int, float], None] | None = None
             ) -> tuple[DemoModel, str]:
    """The base model and the file it came from (building it first when there is none)."""
    if path is None:
        path, exists = base_path()
        if not exists:
            build_base(path, progress)
    return load_model(path), path
