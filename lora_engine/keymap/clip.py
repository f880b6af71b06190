"""HF-layout CLIP text encoders (``CLIPTextModel``/``...WithProjection``; A1111's SD1/SDXL-L
``transformer``; ComfyUI's ``clip_l``/``clip_h``/``clip_g``): kohya's rule applies directly.

``text_model.encoder.layers.0.self_attn.q_proj`` <-> ``<prefix>text_model_encoder_layers_0_self_attn_q_proj``.
A transformers>=5 ``CLIPTextModel`` has no ``text_model`` level, and LoRAs trained on one (LyCORIS,
PEFT) say ``lora_te_encoder_layers_0_…``; both spellings are accepted on every HF-layout root.
"""
from __future__ import annotations

from .roots import Root
from .target import module_target, underscored, unwrapped, weighted_modules


NEST = "text_model."


def hf_spellings(path: str) -> list[str]:
    """The nested path and, for ``text_model.*``, the flat one (``encoder.layers.0…``) that trainers
    write for a transformers>=5 ``CLIPTextModel``."""
    return [path, path[len(NEST):]] if path.startswith(NEST) else [path]


def clip_entries(root: Root, prefix: str):
    """Yield ``(kohya names, dotted paths, Target)`` for each weighted module."""
    nest = NEST if root.naming == "hf_clip_flat" else ""
    for module in weighted_modules(root):
        paths = hf_spellings(nest + unwrapped(module))
        yield [prefix + underscored(p) for p in paths], paths, module_target(root, module, "te")
