"""Which SD family a model is, from its parameters alone.

- SDXL: two text encoders, or a UNet with ``add_embedding``/``label_emb`` (the refiner has one encoder).
- SD2.x: ``proj_in`` is a Linear (2-D weight) or the text encoder is OpenCLIP (fused MHA, ComfyUI ``clip_h``).
- SD1.x: ``proj_in`` is a 1x1 conv, one CLIP text encoder.
"""
from __future__ import annotations

from .roots import Root


def _unet_family(unet: Root) -> str | None:
    keys = unet.shapes
    if any(k.startswith(("add_embedding.", "label_emb.")) for k in keys):
        return "sdxl"
    proj = next((shape for k, shape in keys.items() if k.endswith("proj_in.weight")), None)
    if proj is None:
        return None
    return "sd2" if len(proj) == 2 else "sd1"


def _te_family(tes: list[Root]) -> str | None:
    if len(tes) >= 2:
        return "sdxl"
    if len(tes) == 1:
        te = tes[0]
        return "sd2" if te.naming == "openclip" or te.prefix.startswith("clip_h.") else "sd1"
    return None


def detect_architecture(unet: Root | None, tes: list[Root]) -> str:
    """``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``"unknown"``; the UNet decides when present."""
    if len(tes) >= 2:
        return "sdxl"
    if unet is not None:
        family = _unet_family(unet)
        if family is not None:
            return family
    return _te_family(tes) or "unknown"
