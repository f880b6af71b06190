"""What every lora-engine node shares: the category, input specs and logger.

ComfyUI V1 node contract (``nodes.py``): ``INPUT_TYPES()`` returns ``{"required": {...},
"optional": {...}}`` of ``name: (TYPE, options)``; ``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY``;
``IS_CHANGED(**widget values)`` joins the cache signature. Node ids are prefixed ``LoraEngine``
because ComfyUI silently drops a pack's node whose id equals a built-in one.
"""
from __future__ import annotations

import logging

from . import folders

CATEGORY = "lora-engine"
NONE = "None"


def strength(default: float = 1.0, tooltip: str = "") -> tuple:
    """A strength widget: ComfyUI's LoraLoader range (−100..100, step 0.01); negative allowed."""
    return ("FLOAT", {"default": default, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": tooltip})


def lora_combo(optional: bool = False) -> tuple:
    names = folders.lora_names()
    return (([NONE] + names) if optional else names, {"tooltip": "a file from ComfyUI's loras folders"})


def block_weights() -> tuple:
    return ("STRING", {"default": "", "multiline": False,
                       "tooltip": "optional block weights: an LBW preset (INS, OUTD, ...) or a 12/17/20/26-value vector"})


def mode() -> tuple:
    """How the LoRAs reach the model: merged into the weights (ComfyUI's way; no cost per step) or on the fly
    (side paths at run time; a strength change re-patches nothing)."""
    from .onthefly import MERGED, MODES

    return (list(MODES), {"default": MERGED, "tooltip":
                          "merged: added into the weights when the model loads (no cost per step; a strength "
                          "change re-patches every weight). on the fly: run beside each layer, weights untouched "
                          "(a strength change re-patches nothing; a little extra work per step)"})


log = logging.getLogger("lora_engine")
