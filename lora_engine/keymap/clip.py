"""HF-layout CLIP text encoders (``CLIPTextModel``/``...WithProjection``; A1111's SD1/SDXL-L
``transformer``; ComfyUI's ``clip_l``/``clip_h``/``clip_g``): kohya's rule applies directly.

``text_model.encoder.layers.0.self_attn.q_proj`` <-> ``<prefix>text_model_encoder_layers_0_self_attn_q_proj``.
A transformers>=5 ``CLIPTextModel`` (no ``text_model`` level) gets ``text_model.`` prepended.
"""
from __future__ import annotations

from .roots import Root
from .target import module_target, underscored, weighted_modules


def clip_entries(root: Root, prefix: str):
    """Yield ``(kohya names, dotted paths, Target)`` for each weighted module."""
    nest = "text_model." if root.naming == "hf_clip_flat" else ""
    for module in weighted_modules(root):
        path = nest + module
        yield [prefix + underscored(path)], [path], module_target(root, module, "te")
