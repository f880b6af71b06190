"""Find the UNet and text encoders inside a host's parameter keys, whatever the host's naming.

A root is a key prefix under which one model lives, recognised by a parameter only that model
has (a *marker*). Where each host puts them:

=========================  ==========================================  ==============================
host                       UNet                                        text encoders
=========================  ==========================================  ==============================
diffusers pipeline parts   ``unet.`` (diffusers names)                 ``text_encoder.``, ``text_encoder_2.`` (HF CLIP)
A1111 ldm, SD1             ``model.diffusion_model.`` (ldm names)      ``cond_stage_model.transformer.`` (HF CLIP)
A1111 ldm, SD2             ``model.diffusion_model.``                  ``cond_stage_model.model.`` (OpenCLIP, fused MHA)
A1111 sgm, SDXL            ``model.diffusion_model.``                  ``conditioner.embedders.0.transformer.`` (HF CLIP-L),
                                                                       ``conditioner.embedders.1.model.`` (OpenCLIP-G)
ComfyUI                    ``diffusion_model.`` (BaseModel)            ``clip_l.transformer.``, ``clip_h.transformer.``,
                                                                       ``clip_g.transformer.`` (HF layout)
=========================  ==========================================  ==============================

The first text encoder (kohya ``lora_te_``/``lora_te1_``) is the first root in the order
below; the second (``lora_te2_``) the next. ComfyUI orders ``clip_l`` before ``clip_g``.

transformers>=5 ``CLIPTextModel`` has no ``text_model`` level (keys ``encoder.layers.…``,
``final_layer_norm``); such a root is ``hf_clip_flat`` and LoRA paths get ``text_model.`` prepended.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..families import family_of, markers as family_markers
from ..families.openclip import MARKER as OPENCLIP_MARKER
from ..families.sd import UNET_MARKERS

# Parameter key suffix -> (component, naming). The prefix before it is the root.
MARKERS: dict[str, tuple[str, str]] = {
    **{marker: ("unet", naming) for marker, naming in UNET_MARKERS.items()},  # the SD UNet
    "text_model.final_layer_norm.weight": ("te", "hf_clip"),  # not token_embedding: A1111 wraps that one
    "embeddings.position_embedding.weight": ("te", "hf_clip_flat"),  # transformers>=5 CLIPTextModel
    OPENCLIP_MARKER: ("te", "openclip"),
    "encoder.block.0.layer.0.SelfAttention.q.weight": ("te", "t5"),  # T5 encoder (Flux, SD3)
    # diffusion transformers: the family declaration decides family and naming from the whole root
    **{marker: ("unet", "dit") for marker in family_markers()},
}
# A flat CLIP marker also fits a CLIP *vision* tower (IP-Adapter image encoders): require a token embedding.
CONFIRM: dict[str, tuple[str, ...]] = {
    "hf_clip_flat": ("embeddings.token_embedding.weight", "embeddings.token_embedding.wrapped.weight"),
}
# ComfyUI's CLIP attribute names, in kohya text-encoder order.
_COMFY_ORDER = {"clip_l.": "clip_0.", "clip_h.": "clip_1.", "clip_g.": "clip_2."}


@dataclass(frozen=True)
class Root:
    """One model inside the host's keys: ``keys`` are relative to ``prefix``."""

    component: str  # "unet" | "te"
    naming: str  # "diffusers" | "ldm" | "native" (a DiT's original tree) | "hf_clip" | "hf_clip_flat" | "openclip" | "t5"
    prefix: str
    shapes: dict  # relative parameter key -> shape
    family: str | None = None  # a declared DiT family ("flux", ...); None for the SD UNet (told with the encoders) and encoders

    def full(self, rel: str) -> str:
        return self.prefix + rel


def _te_order(prefix: str) -> str:
    for name, rank in _COMFY_ORDER.items():
        if prefix.startswith(name):
            return rank + prefix[len(name):]
    return prefix


def find_roots(named_shapes) -> tuple[Root | None, list[Root]]:
    """``(unet root or None, text-encoder roots in kohya order)``.

    If several UNets are present (unusual), the one with most parameters wins.
    """
    found: dict[str, tuple[str, str]] = {}
    for key in named_shapes:
        for marker, what in MARKERS.items():
            if key.endswith(marker) and (len(key) == len(marker) or key[-len(marker) - 1] == "."):
                prefix = key[: -len(marker)]
                if what[1] == "hf_clip_flat" and prefix.endswith("text_model."):
                    continue  # the nested layout, found by its own marker
                confirm = CONFIRM.get(what[1])
                if confirm and all(prefix + c not in named_shapes for c in confirm):
                    continue
                found[prefix] = what
    # Longest prefix first so a key is given to its innermost root.
    prefixes = sorted(found, key=len, reverse=True)
    buckets: dict[str, dict] = {p: {} for p in prefixes}
    for key, shape in named_shapes.items():
        for p in prefixes:
            if key.startswith(p):
                buckets[p][key[len(p):]] = tuple(shape)
                break
    roots = []
    for p in prefixes:
        component, naming = found[p]
        family = None
        if naming == "dit":
            fam = family_of(buckets[p])
            if fam is None:
                continue
            family, naming = fam.name, fam.naming(buckets[p])
        roots.append(Root(component, naming, p, buckets[p], family))
    unets = sorted((r for r in roots if r.component == "unet"), key=lambda r: (-len(r.shapes), len(r.prefix)))
    tes = sorted((r for r in roots if r.component == "te"), key=lambda r: _te_order(r.prefix))
    return (unets[0] if unets else None), tes
