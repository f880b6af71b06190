"""Tiny Flux.1 / Chroma / SD3 / SD3.5-Medium models as ComfyUI holds them.

The denoiser is the native (BFL / original-checkpoint) tree of a tiny diffusers transformer
(:func:`tests.fixtures.models.flux.native_state`, checked against diffusers' own single-file converter in
tests/families) under ``diffusion_model.``, as ComfyUI's ``BaseModel`` names it; the CLIP object's
``cond_stage_model`` holds what ComfyUI's ``FluxClipModel`` / ``SD3ClipModel`` / Chroma's T5-only
encoder hold: ``clip_l.transformer`` and ``clip_g.transformer`` (HF CLIP, ``text_model`` level) and
``t5xxl.transformer`` (T5 v1.1 encoder, gated-gelu, ``encoder.block.N.layer.0.SelfAttention.q`` ...),
real transformers modules at toy width.
"""
from __future__ import annotations

import torch
from torch import nn

from tests.fixtures.models.flux import (TINY_CHROMA, TINY_FLUX, TINY_SD3, TINY_SD35M, NativeTree, flux_model,
                                        native_state, sd3_model)
from tests.fixtures.models.hosts import nested_clip
from tests.hosts.comfy.standin import CLIP, ModelPatcher

# the CLIP object's encoders per family, in ComfyUI's attribute names
ENCODERS = {"flux": ("clip_l", "t5xxl"), "chroma": ("t5xxl",), "sd3": ("clip_l", "clip_g", "t5xxl"),
            "sd3.5-medium": ("clip_l", "clip_g", "t5xxl")}
FAMILY = {"flux": "flux", "chroma": "chroma", "sd3": "sd3", "sd3.5-medium": "sd3"}


def _encoder(name: str, seed: int) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    if name == "t5xxl":
        te = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"))
    else:
        width = 48 if name == "clip_g" else 32
        te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=64, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
        te = nested_clip(te)
    with torch.no_grad():
        for p in te.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return te.eval()


def denoiser(kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(the diffusers transformer, its native tree as ComfyUI's ``diffusion_model``)."""
    if kind in ("flux", "chroma"):
        d = flux_model(TINY_CHROMA if kind == "chroma" else TINY_FLUX, seed=seed, chroma=kind == "chroma")
    else:
        d = sd3_model(TINY_SD35M if kind == "sd3.5-medium" else TINY_SD3, seed=seed)
    return d, NativeTree(native_state(d, FAMILY[kind]))


def comfy_dit(kind: str, seed: int = 0) -> tuple[ModelPatcher, CLIP, nn.Module]:
    """(ModelPatcher over ``diffusion_model``, CLIP over the family's encoders, the diffusers transformer)."""
    d, native = denoiser(kind, seed)
    base = nn.Module()
    base.diffusion_model = native
    cond = nn.Module()
    for i, name in enumerate(ENCODERS[kind]):
        holder = nn.Module()
        holder.transformer = _encoder(name, seed + 10 + i)
        setattr(cond, name, holder)
    return ModelPatcher(base), CLIP(cond), d
