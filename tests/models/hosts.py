"""The same tiny model as each host holds it, for key-map and patching tests.

- ``diffusers_root``: a container with ``unet``, ``text_encoder``, ``text_encoder_2``.
- ``a1111_root``: ldm ``LatentDiffusion`` / sgm ``DiffusionEngine`` layout: ``model.diffusion_model``
  (ldm view sharing the diffusers UNet's layers); SD1 ``cond_stage_model.transformer`` (HF CLIP);
  SD2 ``cond_stage_model.model`` (OpenCLIP, a copy in fused layout); SDXL ``conditioner.embedders.0.transformer``
  and ``conditioner.embedders.1.model``. ``wrapped=True`` inserts A1111's hijack ``.wrapped`` level.
- ``comfy_state_dict``: ComfyUI's keys: ``diffusion_model.*`` (BaseModel) and the CLIP patcher's
  ``clip_l.transformer.*`` / ``clip_h.transformer.*`` (SD2) / ``clip_g.transformer.*`` (SDXL), HF layout.
"""
from __future__ import annotations

import torch
from torch import nn

from .ldm_view import ldm_unet_view
from .openclip import OpenCLIPText
from .tiny_sd import TinySD


def shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def nested_clip(te: nn.Module) -> nn.Module:
    """The HF CLIP with a ``text_model`` level, as A1111 and ComfyUI name it (transformers<5 layout).

    transformers>=5 ``CLIPTextModel`` is flat (``encoder.layers…``); the holder shares its modules.
    """
    if hasattr(te, "text_model"):
        return te
    holder = nn.Module()
    holder.text_model = te
    return holder


def diffusers_root(m: TinySD) -> nn.Module:
    root = nn.Module()
    root.unet = m.unet
    root.text_encoder = m.text_encoders[0]
    if len(m.text_encoders) > 1:
        root.text_encoder_2 = m.text_encoders[1]
    return root


def _holder(wrapped: bool, **children) -> nn.Module:
    inner = nn.Module()
    for name, mod in children.items():
        setattr(inner, name, mod)
    if not wrapped:
        return inner
    outer = nn.Module()
    outer.wrapped = inner
    return outer


def a1111_root(m: TinySD, wrapped: bool = False) -> nn.Module:
    root = nn.Module()
    root.model = nn.Module()
    root.model.diffusion_model = ldm_unet_view(m.unet)
    te1 = m.text_encoders[0]
    if m.arch == "sd1":
        root.cond_stage_model = _holder(wrapped, transformer=nested_clip(te1))
    elif m.arch == "sd2":
        root.cond_stage_model = _holder(wrapped, model=OpenCLIPText.from_hf(te1))
    else:
        root.conditioner = nn.Module()
        root.conditioner.embedders = nn.ModuleList([
            _holder(wrapped, transformer=nested_clip(te1)),
            _holder(wrapped, model=OpenCLIPText.from_hf(m.text_encoders[1])),
        ])
    return root


COMFY_CLIP_NAMES = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}


def comfy_unet_state_dict(m: TinySD) -> dict[str, torch.Tensor]:
    """The ComfyUI ``ModelPatcher``'s keys (``BaseModel.diffusion_model``)."""
    return {"diffusion_model." + k: v for k, v in ldm_unet_view(m.unet).state_dict(keep_vars=True).items()}


def comfy_clip_state_dict(m: TinySD) -> dict[str, torch.Tensor]:
    """The ComfyUI CLIP patcher's keys (``cond_stage_model``), HF layout for every encoder."""
    out = {}
    for name, te in zip(COMFY_CLIP_NAMES[m.arch], m.text_encoders):
        state = nested_clip(te).state_dict(keep_vars=True)
        out.update({f"{name}.transformer.{k}": v for k, v in state.items()})
    return out


def comfy_state_dict(m: TinySD) -> dict[str, torch.Tensor]:
    return comfy_unet_state_dict(m) | comfy_clip_state_dict(m)
