"""kohya sd-scripts Flux files trained with ``network_args split_qkv=True`` (``networks/lora_flux.py``).

Such a file trains q, k, v (and the single blocks' mlp) of each fused layer as separate rank-r LoRAs
with alpha α (scale α/r), but saves them fused under the plain names (``…_img_attn_qkv``,
``…_single_blocks_N_linear1``): down = [down_q; down_k; down_v(; down_mlp)] (n·r rows), up block-diagonal
(up_j in rows of part j, columns j·r…(j+1)·r), α unchanged. Every loader (kohya's own, ComfyUI, Forge,
diffusers, lora-engine) reads the scale as α/(n·r), so those layers act n times (3× for ``qkv``, 4× for
``linear1``) weaker than trained (kohya-ss/sd-scripts#2204). The engine applies them as the hosts do and
says so once per file.

Recognised by the saved tensors (an up matrix that is exactly zero off its n diagonal blocks; part
heights from the layer: q = k = v = the input width h, ``linear1``'s mlp the rest), or by the
training metadata ``ss_network_args`` = ``{"split_qkv": "True", …}``.
"""
from __future__ import annotations

import json
import re

import torch

from .writer import STACKED_KEY

_FUSED = re.compile(r"(?:^|[._])(double_blocks[._]\d+[._](?:img|txt)_attn[._]qkv|single_blocks[._]\d+[._]linear1)$")


def _parts(name: str, up: torch.Tensor, width: int) -> list[int] | None:
    """Row heights of the fused layer's parts: [h, h, h] for ``qkv``, [h, h, h, rest] for ``linear1``."""
    o = up.shape[0]
    if name.endswith("qkv"):
        return [width] * 3 if o == 3 * width else None
    return [width] * 3 + [o - 3 * width] if o > 3 * width else None


def block_diagonal(up: torch.Tensor, parts: list[int]) -> bool:
    """Whether ``up`` (Σparts × n·r) is zero outside its n diagonal blocks (and not zero everywhere)."""
    n = len(parts)
    if up.ndim != 2 or up.shape[1] % n or not bool(up.any()):
        return False
    r, start = up.shape[1] // n, 0
    for j, height in enumerate(parts):
        rows = up[start:start + height]
        if bool(rows[:, :j * r].any()) or bool(rows[:, (j + 1) * r:].any()):
            return False
        start += height
    return True


def _metadata_says(metadata: dict) -> bool:
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except (TypeError, ValueError):
        return False
    return isinstance(args, dict) and str(args.get("split_qkv", "")).lower() == "true"


def _stacked_by_us(metadata: dict) -> set[str]:
    """Modules lora-engine's tools stacked from split pieces with α = s·Σr (exact, not kohya's unscaled α)."""
    try:
        names = json.loads(metadata.get(STACKED_KEY) or "[]")
    except (TypeError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def split_modules(modules: dict, metadata: dict) -> dict[str, int]:
    """``{module name: n}`` for the fused modules saved by ``split_qkv`` (n = 3 for qkv, 4 for linear1)."""
    from ..adapters.lora import LoRA

    said = _metadata_says(metadata)
    exact = _stacked_by_us(metadata)
    out = {}
    for name, ma in modules.items():
        a = ma.adapter
        if name in exact or not _FUSED.search(name) or not isinstance(a, LoRA) or a.mid is not None or a.down.ndim != 2:
            continue
        parts = _parts(name, a.up, a.down.shape[1])
        if parts is None or a.rank % len(parts):
            continue
        if block_diagonal(a.up, parts) or (said and a.rank % len(parts) == 0):
            out[name] = len(parts)
    return out


def split_qkv_note(modules: dict, metadata: dict) -> str | None:
    """The one line a user gets for a ``split_qkv`` file, or None."""
    found = split_modules(modules, metadata)
    if not found:
        return None
    qkv = sum(1 for n in found.values() if n == 3)
    lin = len(found) - qkv
    which = " and ".join(p for p in (f"{qkv} attention qkv module(s) 3×" if qkv else "",
                                       f"{lin} single-block linear1 module(s) 4×" if lin else "") if p)
    return (f"saved by kohya sd-scripts with split_qkv, which stores the fused layers with an unscaled alpha "
            f"(kohya-ss/sd-scripts#2204): like the hosts that load Flux LoRAs (ComfyUI, Forge, diffusers), lora-engine applies "
            f"its {which} weaker than they were trained, the other layers as trained; to get the trained effect, "
            f"multiply the alpha of those modules by 3 (qkv) and 4 (linear1) in the file (raising the LoRA's "
            f"strength scales every layer instead)")
