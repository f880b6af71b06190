"""Kohya-format LoRA files for a given model, written by safetensors' own writer in the tests.

Names come from the model's key map (one canonical name per target); values are seeded random,
with ``up`` non-zero so every delta is visible.
"""
from __future__ import annotations

import random

import torch
from safetensors.torch import save_file


def names_by_target(keymap) -> dict:
    """One canonical name per distinct target (the first the key map lists)."""
    out = {}
    for name in keymap.names():
        t = keymap.lookup(name)
        if t is not None and t not in out:
            out[t] = name
    return out


def lowrank_targets(keymap) -> list:
    """Targets a plain LoRA can hit: Linear (2-D) and Conv (4-D) weights."""
    return [t for t in names_by_target(keymap) if len(t.shape) in (2, 4)]


def write_kohya(path, keymap, seed: int, rank: int = 2, alpha: float = 1.0, fraction: float = 0.5,
                component: str | None = None, dtype=torch.float32) -> dict:
    """Write a random LoRA over a seeded subset of the model's targets; returns {name: (down, up, alpha)}."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    names = names_by_target(keymap)
    chosen = [t for t in lowrank_targets(keymap) if (component is None or t.component == component)]
    chosen = [t for t in chosen if rnd.random() < fraction] or chosen[:1]
    sd, truth = {}, {}
    for t in chosen:
        name = names[t]
        o, i = t.shape[0], t.shape[1]
        k = tuple(t.shape[2:])
        down = torch.randn((rank, i, *k), generator=g) * 0.3
        up = torch.randn((o, rank, *([1] * len(k))), generator=g) * 0.3
        sd[f"{name}.lora_down.weight"] = down.to(dtype)
        sd[f"{name}.lora_up.weight"] = up.to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(alpha).to(dtype)
        truth[name] = (down.to(dtype).float(), up.to(dtype).float(), alpha)
    save_file(sd, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return truth


def independent_delta(down: torch.Tensor, up: torch.Tensor, alpha: float, shape) -> torch.Tensor:
    """ΔW = α/r · up·down computed with einsum over explicit indices (not the engine's code path)."""
    r = down.shape[0]
    d2 = down.reshape(r, -1).double()
    u2 = up.reshape(up.shape[0], r).double()
    return (torch.einsum("or,ri->oi", u2, d2) * (alpha / r)).reshape(shape)
