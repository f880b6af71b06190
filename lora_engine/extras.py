"""Optional dependencies: which extra of ``pyproject.toml`` installs each one, and the single line a
command prints when one it needs is missing, e.g.::

    lora-engine demo needs the 'models' extra (no module named 'tqdm'): pip install 'lora-engine[models]'

:func:`check` runs before a command (the packages it cannot start without); :func:`missing_line` turns
a ``ModuleNotFoundError`` met later into the same line (``lora_engine.apps.cli.main`` does both).
"""
from __future__ import annotations

import importlib.util

# Import name -> the extras that install it ([project.optional-dependencies] less "test", in file order).
PROVIDERS = {
    "diffusers": ("models", "train"),
    "transformers": ("models", "train"),
    "PIL": ("models", "ui", "train"),
    "tqdm": ("models", "train"),
    "gradio": ("ui",),
    "prodigyopt": ("train",),
    "lion_pytorch": ("train",),
    "bitsandbytes": ("train-8bit", "quant"),
    "gguf": ("quant",),
}
# Distribution names in pyproject.toml whose import name differs.
IMPORT_NAMES = {"pillow": "PIL", "lion-pytorch": "lion_pytorch"}
# Command -> (the extra to name, the packages it cannot start without).
COMMANDS = {
    "demo": ("models", ("diffusers", "transformers", "PIL", "tqdm")),
    "generate": ("models", ("diffusers", "transformers", "PIL", "tqdm")),
    "train": ("train", ("diffusers", "transformers", "PIL", "tqdm")),
    "serve": ("ui", ("gradio", "PIL")),
}


def missing_line(command: str, module: str | None) -> str | None:
    """The line for ``command`` missing ``module`` (a dotted name is fine), or None when no extra
    provides it (a real bug, to be raised as is)."""
    top = (module or "").split(".")[0]
    extras = PROVIDERS.get(top)
    if not extras:
        return None
    wanted = COMMANDS.get(command, (None, ()))[0]
    extra = wanted if wanted in extras else extras[0]
    return f"lora-engine {command} needs the '{extra}' extra (no module named {module!r}): pip install 'lora-engine[{extra}]'"


def check(command: str) -> str | None:
    """The line for the first package ``command`` needs that cannot be found, or None."""
    for module in COMMANDS.get(command, (None, ()))[1]:
        if importlib.util.find_spec(module) is None:
            return missing_line(command, module)
    return None
