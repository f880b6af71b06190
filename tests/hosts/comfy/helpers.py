"""Read the weights a patched ModelPatcher would run with, and the engine's reference weights."""
from __future__ import annotations

import torch

from lora_engine.formats import load_lora
from lora_engine.patch import StackEntry


def patched_state(patcher) -> dict[str, torch.Tensor]:
    """The state dict while ``patcher``'s patches are applied (then restored)."""
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}
    finally:
        patcher.unpatch_model()


def engine_state(engine, entries) -> dict[str, torch.Tensor]:
    """lora-engine's own merged weights for ``entries`` ((path, te, unet) or StackEntry), then restored."""
    stack = [e if isinstance(e, StackEntry) else StackEntry(load_lora(e[0]), te=e[1], unet=e[2]) for e in entries]
    engine.set_stack(stack)
    try:
        return {k: v.detach().clone() for k, v in engine.root.state_dict().items()}
    finally:
        engine.restore()


def assert_equal_weights(ours: dict, ref: dict, base: dict) -> int:
    """Every key of ``ours`` equals ``ref`` bit for bit; returns how many changed from ``base``."""
    changed = 0
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), f"{k}: max diff {(v - ref[k]).abs().max().item():.3g}"
        changed += not torch.equal(v, base[k])
    return changed
