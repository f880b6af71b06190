"""Optimiser factory: AdamW always; AdamW8bit (bitsandbytes), Prodigy (prodigyopt) and Lion
(lion-pytorch) when their packages are installed (the ``train`` extra)."""
from __future__ import annotations

import importlib

import torch

from ..errors import TrainingError

# name -> (module, class, pip package)
OPTIONAL = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
}


def available() -> list[str]:
    out = ["adamw"]
    for name, (mod, _, _) in OPTIONAL.items():
        try:
            importlib.import_module(mod)
            out.append(name)
        except Exception:  # a broken optional install must not stop AdamW users
            pass
    return out


def make_optimizer(name: str, groups: list[dict], weight_decay: float, args: dict | None = None):
    key = name.lower().replace("_", "").replace("-", "")
    args = dict(args or {})
    if key == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay, **args)
    if key not in OPTIONAL:
        raise TrainingError(f"unknown optimizer {name!r} (adamw, {', '.join(OPTIONAL)})")
    mod, cls, pkg = OPTIONAL[key]
    try:
        module = importlib.import_module(mod)
    except Exception as e:
        raise TrainingError(f"optimizer {name} needs the package {pkg} (pip install {pkg}): {e}") from None
    return getattr(module, cls)(groups, weight_decay=weight_decay, **args)
