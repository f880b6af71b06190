"""Write a single-file ldm/sgm checkpoint (A1111/ComfyUI layout) from diffusers/transformers parts.

UNet: the ldm view's own state dict (``ldm_view``); CLIP-L: the HF keys under the ldm prefix;
OpenCLIP: the fused tower's state dict (``openclip.OpenCLIPText.from_hf``); VAE: the ldm
``Encoder``/``Decoder`` names written out here by rule (diffusers' script
``convert_diffusers_to_original_stable_diffusion.py`` is not in the package), with the mid-block
attention as 1x1 convolutions as ldm stores them.
"""
from __future__ import annotations

import re

import torch

from .ldm_view import ldm_unet_view
from .openclip import OpenCLIPText

TE_PREFIX = {"sd1": ("cond_stage_model.transformer.",), "sd2": ("cond_stage_model.model.",),
             "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")}


def ldm_vae_key(key: str, n_levels: int) -> str:
    """diffusers ``AutoencoderKL`` key -> ldm ``first_stage_model`` key (without the prefix)."""
    k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
               lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.block.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.upsample.", k)
    k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
    k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
    for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")):
        if "mid.attn_1." in k:
            k = k.replace("mid.attn_1." + a, "mid.attn_1." + b)
    return k


def ldm_state_dict(arch: str, unet, text_encoders, vae) -> dict[str, torch.Tensor]:
    sd = {"model.diffusion_model." + k: v for k, v in ldm_unet_view(unet).state_dict().items()}
    n = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        lk = ldm_vae_key(k, n)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", lk):
            v = v[:, :, None, None]  # ldm's AttnBlock uses 1x1 convs
        sd["first_stage_model." + lk] = v
    for prefix, te in zip(TE_PREFIX[arch], text_encoders):
        if prefix.endswith(".transformer."):
            sd.update({prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
                       for k, v in te.state_dict().items()})  # the real layout, whatever transformers' level
        else:
            sd.update({prefix + k: v for k, v in OpenCLIPText.from_hf(te).state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def write_ldm_checkpoint(path: str, arch: str, unet, text_encoders, vae, dtype: torch.dtype | None = None) -> str:
    from safetensors.torch import save_file

    sd = ldm_state_dict(arch, unet, text_encoders, vae)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_file(sd, path)
    return path
