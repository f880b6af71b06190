"""Tiny SD models as ComfyUI holds them: ``BaseModel.diffusion_model`` (ldm names) behind a
ModelPatcher, and a CLIP whose ``cond_stage_model`` has ``clip_l``/``clip_h``/``clip_g`` ``.transformer``
(HF layout), from :mod:`tests.fixtures.models` (real diffusers/transformers modules)."""
from __future__ import annotations

from torch import nn

from tests.hosts.comfy.standin import CLIP, ModelPatcher
from tests.fixtures.models.hosts import COMFY_CLIP_NAMES, nested_clip
from tests.fixtures.models.ldm_view import ldm_unet_view
from tests.fixtures.models.tiny_sd import TinySD


def comfy_modules(m: TinySD) -> tuple[nn.Module, nn.Module]:
    """(BaseModel-like root with ``diffusion_model``, ``cond_stage_model`` with ``clip_*.transformer``)."""
    base = nn.Module()
    base.diffusion_model = ldm_unet_view(m.unet)
    cond = nn.Module()
    for name, te in zip(COMFY_CLIP_NAMES[m.arch], m.text_encoders):
        holder = nn.Module()
        holder.transformer = nested_clip(te)
        setattr(cond, name, holder)
    return base, cond


def comfy_pair(arch: str = "sd1", seed: int = 0) -> tuple[ModelPatcher, CLIP, TinySD]:
    m = TinySD.build(arch, seed)
    base, cond = comfy_modules(m)
    return ModelPatcher(base), CLIP(cond), m


def reference_root(arch: str = "sd1", seed: int = 0) -> nn.Module:
    """The same weights (rebuilt from the seed), in one root with ComfyUI's keys of both patchers:
    what lora-engine's own engine patches for the reference result."""
    base, cond = comfy_modules(TinySD.build(arch, seed))
    root = nn.Module()
    root.diffusion_model = base.diffusion_model
    for name, child in cond.named_children():
        setattr(root, name, child)
    return root
