"""Model families as declarations (one module per family: trees, fused row layouts from config,
text encoders, blocks). The key map, diagnosis and block weights read them from here.

``FAMILIES``: the diffusion transformers, each told from its denoiser alone: ``family_of(shapes)``
names the family of a denoiser root from its relative parameter keys. ``SD_FAMILIES``: SD1.x, SD2.x,
SDXL, which share one UNet tree and are told from the whole model (``sd.sd_family``).
"""
from __future__ import annotations

from collections.abc import Mapping

from .base import Family, FamilyMismatch, Layer, Part, TextEncoder
from .flux import CHROMA, FLUX
from .nextdit import LUMINA2, Z_IMAGE
from .qwen_image import QWEN_IMAGE
from .sd import SD_FAMILIES, sd_family
from .sd3 import SD3
from .wan import WAN

# Order matters where markers are shared: a variant (with ``requires``) before its parent. SD3's diffusers marker
# (``add_q_proj``) is Qwen-Image's too (SD3 requires ``pos_embed.proj``); Z-Image and Lumina 2 share their native
# marker (each requires its own modulation index).
FAMILIES: tuple[Family, ...] = (CHROMA, FLUX, SD3, QWEN_IMAGE, WAN, Z_IMAGE, LUMINA2)
BY_NAME: dict[str, Family] = {f.name: f for f in (*FAMILIES, *SD_FAMILIES)}


def markers() -> dict[str, str]:
    """Every family's marker key -> its naming (``native``/``diffusers``)."""
    out: dict[str, str] = {}
    for f in FAMILIES:
        out.update(f.markers)
    return out


def family_of(shapes: Mapping[str, tuple]) -> Family | None:
    """The declared family whose tree these (root-relative) keys are, or None."""
    return next((f for f in FAMILIES if f.fits(shapes)), None)


__all__ = ["Family", "FamilyMismatch", "Layer", "Part", "TextEncoder", "FAMILIES", "SD_FAMILIES", "BY_NAME", "family_of",
           "markers", "sd_family"]
