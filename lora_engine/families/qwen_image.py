"""Qwen-Image (and Qwen-Image-Edit / Edit-2509 / Edit-2511: the same tree).

The released checkpoint, ComfyUI's ``QwenImageTransformer2DModel`` and diffusers' use the same module
names, so every layer is one whole module in both trees and no row block is split or reordered
(h = heads · head_dim = 24 · 128 in the released model; 60 blocks):

- ``transformer_blocks.N.attn.{to_q,to_k,to_v,to_out.0}`` (image stream), ``attn.{add_q_proj,add_k_proj,
  add_v_proj,to_add_out}`` (text stream), ``attn.norm_{q,k}`` / ``attn.norm_added_{q,k}`` (RMSNorm, head_dim);
- ``img_mod.1`` / ``txt_mod.1`` (h -> 6h, ``nn.Sequential(SiLU, Linear)``), ``img_mlp.net.0.proj`` /
  ``img_mlp.net.2`` (GELU-tanh MLP, 4h), ``txt_mlp`` likewise;
- ``img_in``, ``txt_in``, ``txt_norm``, ``time_text_embed.timestep_embedder.linear_{1,2}``, ``norm_out.linear``
  (``[scale; shift]`` in both trees), ``proj_out``.

LoRA files name these modules as they are (ai-toolkit ``diffusion_model.<path>.lora_A``, diffusers/PEFT
``transformer.<path>``, DiffSynth bare ``<path>.lora_A``, ``.lora_A.default.weight``) or kohya-flattened
(musubi-tuner ``lora_unet_<path with _>``, LyCORIS ``lycoris_<path with _>``): the flattened names are
built from this declaration, never un-flattened by guessing where a ``_`` was a dot.
Text encoder: Qwen2.5-VL; the trainers write transformer LoRAs only (diffusers loads no other).
Facts from ComfyUI ``comfy/ldm/qwen_image/model.py`` and diffusers ``transformer_qwenimage.py``.
"""
from __future__ import annotations

import re

from .base import Family, FamilyMismatch, Layer, count_blocks, rows_of, same

_MARKER = "transformer_blocks.0.img_mod.1.weight"
_BLOCK_LAYERS = ("img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                 "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                 "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k",
                 "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
_TOP = ("img_in", "txt_in", "txt_norm", "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out")


def qwen_config(shapes, naming: str) -> dict:
    inner = rows_of(shapes, "img_in.weight")
    head_dim = rows_of(shapes, "transformer_blocks.0.attn.norm_q.weight")
    depth = count_blocks(shapes, "transformer_blocks")
    if inner is None or not depth:
        raise FamilyMismatch("no image input projection or transformer blocks: not a Qwen-Image tree")
    if head_dim is not None and inner % head_dim:
        raise FamilyMismatch(f"width {inner} is not a multiple of the head size {head_dim}")
    return {"inner": inner, "head_dim": head_dim, "depth": depth}


def qwen_layers(cfg: dict) -> list[Layer]:
    layers = [same(p, p) for p in _TOP]
    for i in range(cfg["depth"]):
        layers += [same(f"transformer_blocks.{i}.{p}", f"transformer_blocks.{i}.{p}") for p in _BLOCK_LAYERS]
    return layers


def qwen_blocks(cfg: dict) -> list[str]:
    return [f"transformer_blocks.{i}" for i in range(cfg["depth"])]


_BLOCK = re.compile(r"^transformer_blocks[._](\d+)[._]")


def qwen_block_of(path: str) -> str | None:
    m = _BLOCK.match(path)
    return None if m is None else f"transformer_blocks.{m.group(1)}"


QWEN_IMAGE = Family(
    name="qwen_image", label="Qwen-Image", markers={_MARKER: "diffusers"}, config=qwen_config,
    layer_list=qwen_layers, text_encoders=(), blocks=qwen_blocks, block_of=qwen_block_of,
    # names only Qwen-Image has: its per-stream modulation and MLPs, and blocks past SD3.5-Large's 38
    lora_patterns=(re.compile(r"^lora_unet_transformer_blocks_\d+_(img_mod|txt_mod|img_mlp|txt_mlp)_"),
                   re.compile(r"^lora_unet_transformer_blocks_(3[89]|[4-9]\d)_")),
)
