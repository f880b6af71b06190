"""Stable Diffusion 3 / 3.5 (MMDiT): SD3-Medium, SD3.5-Large/-Large-Turbo, SD3.5-Medium (``attn2``).

Native (original checkpoint/ComfyUI) -> diffusers ``SD3Transformer2DModel``; h = heads · head_dim
(= 64 · depth in the released models, = the patch embedding's width); q, k, v are each h rows
(no grouped heads):

- ``joint_blocks.N.x_block.attn.qkv`` = ``transformer_blocks.N.attn.[to_q; to_k; to_v]``,
  ``context_block.attn.qkv`` = ``[add_q_proj; add_k_proj; add_v_proj]``; ``x_block.attn.proj`` =
  ``attn.to_out.0``, ``context_block.attn.proj`` = ``attn.to_add_out`` (not in the last block);
  3.5-Medium: ``x_block.attn2.qkv`` = ``attn2.[to_q; to_k; to_v]``, ``attn2.proj`` = ``attn2.to_out.0``;
  ``attn{,2}.ln_{q,k}`` = ``attn{,2}.norm_{q,k}`` (``norm_added_{q,k}`` for the context block);
  ``x_block.mlp.fc1/fc2`` = ``ff.net.0.proj``/``ff.net.2``, context: ``ff_context``; ``x_block.adaLN_modulation.1``
  = ``norm1.linear``, ``context_block.adaLN_modulation.1`` = ``norm1_context.linear``, except in the last
  block, where it is stored ``[shift; scale]`` natively and ``[scale; shift]`` in diffusers.
- ``x_embedder.proj`` = ``pos_embed.proj`` (a conv), ``t_embedder.mlp.{0,2}`` / ``y_embedder.mlp.{0,2}`` =
  ``time_text_embed.{timestep,text}_embedder.linear_{1,2}``, ``context_embedder`` same name,
  ``final_layer.linear`` = ``proj_out``, ``final_layer.adaLN_modulation.1`` = ``norm_out.linear`` (swapped).

Text encoders: CLIP-L (kohya ``lora_te1_``), CLIP-G (``lora_te2_``), T5-XXL (``lora_te3_``; diffusers
``text_encoder``, ``text_encoder_2``, ``text_encoder_3``). Blocks: ``joint_blocks.0..N-1``.
Facts from diffusers ``convert_sd3_transformer_checkpoint_to_diffusers``, the tests' oracle.
"""
from __future__ import annotations

import re

from .base import Family, FamilyMismatch, Layer, TextEncoder, count_blocks, rows_of, same, stacked, swap_scale_shift

_NATIVE_QKV = "joint_blocks.0.x_block.attn.qkv.weight"


def sd3_config(shapes, naming: str) -> dict:
    if naming == "native":
        inner = rows_of(shapes, "x_embedder.proj.weight")
        depth = count_blocks(shapes, "joint_blocks")
        head_dim = rows_of(shapes, "joint_blocks.0.x_block.attn.ln_q.weight")
    else:
        inner = rows_of(shapes, "pos_embed.proj.weight")
        depth = count_blocks(shapes, "transformer_blocks")
        head_dim = rows_of(shapes, "transformer_blocks.0.attn.norm_q.weight")
    if inner is None or not depth:
        raise FamilyMismatch("no patch embedding or joint blocks: not an SD3 tree")
    # q, k, v are each heads·head_dim = the model width (the patch embedding's output) high; head_dim is
    # known only from a q/k norm (SD3.5), and the layout does not need it
    if head_dim is not None and inner % head_dim:
        raise FamilyMismatch(f"width {inner} is not a multiple of the head size {head_dim}")
    cfg = {"inner": inner, "q": inner, "head_dim": head_dim, "heads": None if head_dim is None else inner // head_dim,
           "depth": depth}
    qkv = rows_of(shapes, _NATIVE_QKV)
    if naming == "native" and qkv is not None and qkv != 3 * inner:
        raise FamilyMismatch(f"{_NATIVE_QKV[:-7]} has {qkv} rows, SD3's layout needs q+k+v = {3 * inner}")
    return cfg


def _attn(native: str, diffusers: str, q: int, proj: str | None, added: bool = False) -> list[Layer]:
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
    norms = ("norm_added_q", "norm_added_k") if added else ("norm_q", "norm_k")
    layers = [stacked(native + "qkv", [(diffusers + n, q) for n in names]),
              same(native + "ln_q", diffusers + norms[0]), same(native + "ln_k", diffusers + norms[1])]
    if proj is not None:
        layers.append(same(native + "proj", diffusers + proj))
    return layers


def _block(i: int, cfg: dict) -> list[Layer]:
    j, t = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
    q = cfg["q"]
    last = i == cfg["depth"] - 1
    x, c = j + "x_block.", j + "context_block."
    layers = _attn(x + "attn.", t + "attn.", q, "to_out.0")
    layers += _attn(x + "attn2.", t + "attn2.", q, "to_out.0")
    layers += _attn(c + "attn.", t + "attn.", q, None if last else "to_add_out", added=True)
    layers += [same(x + "mlp.fc1", t + "ff.net.0.proj"), same(x + "mlp.fc2", t + "ff.net.2"),
               same(c + "mlp.fc1", t + "ff_context.net.0.proj"), same(c + "mlp.fc2", t + "ff_context.net.2"),
               same(x + "adaLN_modulation.1", t + "norm1.linear")]
    if last:
        layers.append(swap_scale_shift(c + "adaLN_modulation.1", t + "norm1_context.linear", cfg["inner"]))
    else:
        layers.append(same(c + "adaLN_modulation.1", t + "norm1_context.linear"))
    return layers


_TOP = [("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"), ("final_layer.linear", "proj_out"),
        ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")]


def sd3_layers(cfg: dict) -> list[Layer]:
    layers = [same(n, d) for n, d in _TOP]
    layers.append(swap_scale_shift("final_layer.adaLN_modulation.1", "norm_out.linear", cfg["inner"]))
    for i in range(cfg["depth"]):
        layers += _block(i, cfg)
    return layers


def sd3_blocks(cfg: dict) -> list[str]:
    return [f"joint_blocks.{i}" for i in range(cfg["depth"])]


_BLOCK = re.compile(r"^(joint_blocks|transformer_blocks)[._](\d+)[._]")


def sd3_block_of(path: str) -> str | None:
    m = _BLOCK.match(path)
    return None if m is None else f"joint_blocks.{m.group(2)}"


SD3 = Family(
    name="sd3", label="SD3", markers={_NATIVE_QKV: "native", "transformer_blocks.0.attn.add_q_proj.weight": "diffusers"},
    config=sd3_config, layer_list=sd3_layers,
    text_encoders=(TextEncoder("clip_l", ("lora_te1_", "lora_te_"), "text_encoder"),
                   TextEncoder("clip_g", ("lora_te2_",), "text_encoder_2"),
                   TextEncoder("t5", ("lora_te3_",), "text_encoder_3")),
    blocks=sd3_blocks, block_of=sd3_block_of, requires={"diffusers": ("pos_embed.proj.",)},
    excludes=("single_transformer_blocks.", "double_blocks.", "single_blocks."),
    lora_patterns=(re.compile(r"^lora_unet_joint_blocks_"),),
)
