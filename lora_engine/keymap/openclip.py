"""OpenCLIP text encoders as ldm/sgm hold them (SD2's OpenCLIP-H, SDXL's OpenCLIP-G).

LoRA files name these layers in HF-CLIP layout (kohya rebuilds OpenCLIP as ``CLIPTextModel``),
so each native layer is listed under its HF path. q/k/v live fused in
``attn.in_proj_weight`` (``nn.MultiheadAttention``), stacked on dim 0 in that order:
``q_proj`` = rows ``[0, d)``, ``k_proj`` = ``[d, 2d)``, ``v_proj`` = ``[2d, 3d)``, same for
``in_proj_bias``. Facts from diffusers ``convert_open_clip_checkpoint`` (the tests' oracle).

``text_projection`` is stored transposed (``(width, proj)`` vs HF's Linear ``(proj, width)``), which
a row/col-free Target cannot express, so it is not mapped.
"""
from __future__ import annotations

import re

from .clip import hf_spellings
from .roots import Root
from .target import Target, module_target, underscored, unwrapped, weighted_modules

_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")
# Per-layer OpenCLIP child -> HF child (exceptions table).
LAYER_RENAMES: dict[str, str] = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}
TOP_RENAMES: dict[str, str] = {
    "ln_final": "text_model.final_layer_norm",
    "token_embedding": "text_model.embeddings.token_embedding",
}
FUSED_ORDER = ("q_proj", "k_proj", "v_proj")
POSITIONAL = ("positional_embedding", "text_model.embeddings.position_embedding")


def hf_path(native: str) -> str | None:
    """``transformer.resblocks.3.mlp.c_fc`` -> ``text_model.encoder.layers.3.mlp.fc1``; None if unmapped."""
    if native in TOP_RENAMES:
        return TOP_RENAMES[native]
    m = _LAYER.match(native)
    if m and m.group(2) in LAYER_RENAMES:
        return f"text_model.encoder.layers.{m.group(1)}.{LAYER_RENAMES[m.group(2)]}"
    return None


def _fused(root: Root, layer: str):
    weight = f"transformer.resblocks.{layer}.attn.in_proj_weight"
    bias = f"transformer.resblocks.{layer}.attn.in_proj_bias"
    shape = root.shapes[weight]
    d = shape[0] // 3
    for i, proj in enumerate(FUSED_ORDER):
        target = Target(root.full(weight), root.full(bias) if bias in root.shapes else None,
                        (i * d, (i + 1) * d), "te", (d, *shape[1:]))
        yield f"text_model.encoder.layers.{layer}.self_attn.{proj}", target


def _names(prefix: str, path: str) -> list[str]:
    return [prefix + underscored(p) for p in hf_spellings(path)]


def openclip_entries(root: Root, prefix: str):
    """Yield ``(kohya names, dotted HF paths, Target)`` for each mappable OpenCLIP weight."""
    for module in weighted_modules(root):
        path = hf_path(unwrapped(module))
        if path is not None:
            yield _names(prefix, path), hf_spellings(path), module_target(root, module, "te")
    for key in root.shapes:
        m = _IN_PROJ.match(key)
        if m:
            for path, target in _fused(root, m.group(1)):
                yield _names(prefix, path), hf_spellings(path), target
    native, path = POSITIONAL
    if native in root.shapes:
        target = Target(root.full(native), None, None, "te", tuple(root.shapes[native]))
        yield _names(prefix, path), hf_spellings(path), target
