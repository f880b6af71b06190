"""Tiny seeded SD1-, SD2- and SDXL-shaped diffusers UNets and transformers CLIP text encoders.

Shapes follow the real families at toy size: SD1 (1x1-conv proj_in/out, attention in all but the
last down level), SD2 (linear proj, per-level head counts, OpenCLIP-H-like text encoder with GELU),
SDXL (3 levels, no attention in the first, transformer depth > 1 deeper down, ``text_time`` added
embedding, CLIP-L + OpenCLIP-G-like second encoder with projection). Every parameter is nudged by
seeded noise so no two layers hold equal values (norms start as ones/zeros otherwise); that lets
tests identify a layer by its values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ARCHS = ("sd1", "sd2", "sdxl")
_TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _distinct(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def unet_config(arch: str) -> dict:
    base = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=4,
                block_out_channels=(8, 16, 16))
    if arch == "sd1":
        return base | dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                           cross_attention_dim=12, attention_head_dim=2)
    if arch == "sd2":
        return base | dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                           cross_attention_dim=16, attention_head_dim=(2, 4, 4), use_linear_projection=True)
    if arch == "sdxl":
        te2 = text_encoder_config("sdxl", 2)
        return base | dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           cross_attention_dim=12 + te2["hidden_size"], attention_head_dim=(2, 2, 4),
                           transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                           addition_embed_type="text_time", addition_time_embed_dim=4,
                           projection_class_embeddings_input_dim=te2["projection_dim"] + 6 * 4)
    raise ValueError(arch)


def text_encoder_config(arch: str, index: int = 1) -> dict:
    """index 1: CLIP-L-like (SD1, SDXL te1) or OpenCLIP-H-like (SD2); index 2: OpenCLIP-G-like (SDXL)."""
    if arch == "sd2" or index == 2:
        hidden = 16 if arch == "sd2" else 20
        return dict(vocab_size=64, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=3,
                    num_attention_heads=2, max_position_embeddings=10, hidden_act="gelu", projection_dim=hidden, **_TOKENS)
    return dict(vocab_size=64, hidden_size=12, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=10, hidden_act="quick_gelu", projection_dim=12, **_TOKENS)


def tiny_unet(arch: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _distinct(UNet2DConditionModel(**unet_config(arch)), seed)


def tiny_text_encoder(arch: str, index: int = 1, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed + index)
    cls = CLIPTextModelWithProjection if (arch == "sdxl" and index == 2) else CLIPTextModel
    return _distinct(cls(CLIPTextConfig(**text_encoder_config(arch, index))), seed + index)


@dataclass
class TinySD:
    """One tiny model of a family: the diffusers UNet and the HF text encoder(s)."""

    arch: str
    unet: torch.nn.Module
    text_encoders: list

    @classmethod
    def build(cls, arch: str, seed: int = 0) -> "TinySD":
        tes = [tiny_text_encoder(arch, 1, seed)]
        if arch == "sdxl":
            tes.append(tiny_text_encoder(arch, 2, seed))
        return cls(arch, tiny_unet(arch, seed), tes)
