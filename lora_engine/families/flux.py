"""Flux.1 (dev, schnell, Kontext, Krea: one tree) and Chroma (the Flux tree without per-block
modulation, plus a distilled guidance approximator).

Native (BFL/ComfyUI) -> diffusers ``FluxTransformer2DModel`` / ``ChromaTransformer2DModel``; h = heads ·
head_dim, q = heads · head_dim, k = v = kv_heads · head_dim (Flux: kv_heads = heads), m = mlp width:

- ``double_blocks.N.img_attn.qkv`` (h -> q+k+v) = ``transformer_blocks.N.attn.[to_q; to_k; to_v]``,
  ``txt_attn.qkv`` = ``[add_q_proj; add_k_proj; add_v_proj]``; ``img_attn.proj`` = ``attn.to_out.0``,
  ``txt_attn.proj`` = ``attn.to_add_out``; ``img_mlp.0/.2`` = ``ff.net.0.proj``/``ff.net.2``, ``txt_mlp`` =
  ``ff_context``; ``img_mod.lin`` = ``norm1.linear``, ``txt_mod.lin`` = ``norm1_context.linear``;
  ``{img,txt}_attn.norm.{query,key}_norm.scale`` = ``attn.norm_{q,k}`` / ``attn.norm_added_{q,k}``.
- ``single_blocks.N.linear1`` (h -> q+k+v+m) = ``single_transformer_blocks.N.[attn.to_q; attn.to_k; attn.to_v;
  proj_mlp]``; ``linear2`` (h+m -> h) = ``proj_out``; ``modulation.lin`` = ``norm.linear``; norms as above.
- ``img_in`` = ``x_embedder``, ``txt_in`` = ``context_embedder``, ``{time,vector,guidance}_in.{in,out}_layer`` =
  ``time_text_embed.{timestep,text,guidance}_embedder.linear_{1,2}``, ``final_layer.linear`` = ``proj_out``,
  ``final_layer.adaLN_modulation.1`` ([shift; scale]) = ``norm_out.linear`` ([scale; shift]).
- Chroma: ``distilled_guidance_layer.{in_proj,out_proj}`` same names, ``layers.N.{in,out}_layer`` =
  ``layers.N.linear_{1,2}``, ``norms.N.scale`` = ``norms.N.weight``.

Text encoders: CLIP-L (kohya ``lora_te1_``) and T5-XXL (kohya ``lora_te3_``, OneTrainer ``lora_te2_``,
diffusers ``text_encoder_2``); Chroma: T5 only (diffusers ``text_encoder``).
Blocks: ``double_blocks.0..18``, ``single_blocks.0..37`` for Flux.1-dev.
Facts from diffusers ``convert_flux_transformer_checkpoint_to_diffusers`` /
``convert_chroma_transformer_checkpoint_to_diffusers``, the tests' oracles.
"""
from __future__ import annotations

import re

from .base import (Family, FamilyMismatch, Layer, TextEncoder, Window, count_blocks, rows_of, same, stacked,
                   swap_scale_shift)

NATIVE_MARKERS = {"double_blocks.0.img_attn.qkv.weight": "native", "single_blocks.0.linear1.weight": "native"}
DIFFUSERS_MARKERS = {"single_transformer_blocks.0.proj_mlp.weight": "diffusers"}
_APPROX = "distilled_guidance_layer."
_FLUX2 = ("double_stream_modulation_img.", "single_stream_modulation.")


def flux_config(shapes, naming: str) -> dict:
    """Widths and block counts from the tensors (relative keys) of a native or diffusers tree."""
    if naming == "native":
        inner = rows_of(shapes, "img_in.weight")
        head_dim = rows_of(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale")
        mlp = rows_of(shapes, "double_blocks.0.img_mlp.0.weight")
        double, single = count_blocks(shapes, "double_blocks"), count_blocks(shapes, "single_blocks")
        approx = count_blocks(shapes, "distilled_guidance_layer.layers")
    else:
        inner = rows_of(shapes, "x_embedder.weight")
        head_dim = rows_of(shapes, "transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight")
        mlp = rows_of(shapes, "transformer_blocks.0.ff.net.0.proj.weight", "single_transformer_blocks.0.proj_mlp.weight")
        double, single = count_blocks(shapes, "transformer_blocks"), count_blocks(shapes, "single_transformer_blocks")
        approx = count_blocks(shapes, "distilled_guidance_layer.layers")
    if inner is None or head_dim is None:
        raise FamilyMismatch("no input embedding or attention norm: not a Flux tree")
    if inner % head_dim:
        raise FamilyMismatch(f"width {inner} is not a multiple of the head size {head_dim}")
    heads = inner // head_dim
    cfg = {"inner": inner, "head_dim": head_dim, "heads": heads, "kv_heads": heads, "mlp": mlp,
           "double": double, "single": single, "approximator": approx}
    if naming == "native":
        _check_fused(shapes, cfg)
    return cfg


def _check_fused(shapes, cfg: dict) -> None:
    """The fused tensors must be exactly q+k+v (+m) high; anything else is another model."""
    q, kv = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    qkv = rows_of(shapes, "double_blocks.0.img_attn.qkv.weight")
    if qkv is not None and qkv != q + 2 * kv:
        raise FamilyMismatch(f"double_blocks.0.img_attn.qkv has {qkv} rows, Flux's layout needs q+k+v = {q + 2 * kv}")
    lin1 = rows_of(shapes, "single_blocks.0.linear1.weight")
    if lin1 is not None:
        if cfg["mlp"] is None:
            cfg["mlp"] = lin1 - q - 2 * kv
        if lin1 != q + 2 * kv + cfg["mlp"]:
            raise FamilyMismatch(f"single_blocks.0.linear1 has {lin1} rows, Flux's layout needs "
                                 f"q+k+v+mlp = {q + 2 * kv + cfg['mlp']}")


def _double(i: int, q: int, kv: int) -> list[Layer]:
    d, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    return [
        same(d + "img_mod.lin", t + "norm1.linear"),
        same(d + "txt_mod.lin", t + "norm1_context.linear"),
        stacked(d + "img_attn.qkv", [(t + "attn.to_q", q), (t + "attn.to_k", kv), (t + "attn.to_v", kv)]),
        stacked(d + "txt_attn.qkv", [(t + "attn.add_q_proj", q), (t + "attn.add_k_proj", kv), (t + "attn.add_v_proj", kv)]),
        same(d + "img_attn.proj", t + "attn.to_out.0"),
        same(d + "txt_attn.proj", t + "attn.to_add_out"),
        same(d + "img_mlp.0", t + "ff.net.0.proj"),
        same(d + "img_mlp.2", t + "ff.net.2"),
        same(d + "txt_mlp.0", t + "ff_context.net.0.proj"),
        same(d + "txt_mlp.2", t + "ff_context.net.2"),
        same(d + "img_attn.norm.query_norm", t + "attn.norm_q", "scale"),
        same(d + "img_attn.norm.key_norm", t + "attn.norm_k", "scale"),
        same(d + "txt_attn.norm.query_norm", t + "attn.norm_added_q", "scale"),
        same(d + "txt_attn.norm.key_norm", t + "attn.norm_added_k", "scale"),
    ]


def _single(i: int, q: int, kv: int, mlp: int) -> list[Layer]:
    s, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    return [
        stacked(s + "linear1", [(t + "attn.to_q", q), (t + "attn.to_k", kv), (t + "attn.to_v", kv), (t + "proj_mlp", mlp)]),
        same(s + "linear2", t + "proj_out"),
        same(s + "modulation.lin", t + "norm.linear"),
        same(s + "norm.query_norm", t + "attn.norm_q", "scale"),
        same(s + "norm.key_norm", t + "attn.norm_k", "scale"),
    ]


_TOP = [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out")] + [
    (f"{n}_in.{a}_layer", f"time_text_embed.{d}_embedder.linear_{j}")
    for n, d in (("time", "timestep"), ("vector", "text"), ("guidance", "guidance")) for j, a in ((1, "in"), (2, "out"))]


def flux_layers(cfg: dict) -> list[Layer]:
    """Every targetable layer of a Flux.1 / Chroma tree of this config (the model keeps those it has)."""
    q, kv = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    layers = [same(n, d) for n, d in _TOP]
    layers.append(swap_scale_shift("final_layer.adaLN_modulation.1", "norm_out.linear", cfg["inner"]))
    for i in range(cfg["double"]):
        layers += _double(i, q, kv)
    for i in range(cfg["single"]):
        layers += _single(i, q, kv, cfg["mlp"])
    a = _APPROX
    layers += [same(a + "in_proj", a + "in_proj"), same(a + "out_proj", a + "out_proj")]
    for i in range(cfg["approximator"]):
        layers += [same(f"{a}layers.{i}.in_layer", f"{a}layers.{i}.linear_1"),
                   same(f"{a}layers.{i}.out_layer", f"{a}layers.{i}.linear_2"),
                   same(f"{a}norms.{i}", f"{a}norms.{i}", "scale")]
    return layers


def flux_windows(cfg: dict, layers: list[Layer]) -> list[Window]:
    """``single_blocks.N.linear1_qkv``: the q, k, v rows of ``linear1`` (XLabs' single-block ``qkv_lora``;
    ComfyUI's key map has the same name)."""
    qkv = cfg["heads"] * cfg["head_dim"] + 2 * cfg["kv_heads"] * cfg["head_dim"]
    return [Window(layer.native + "_qkv", layer, (0, qkv)) for layer in layers if layer.native.endswith(".linear1")]


# XLabs (x-flux) processor LoRA names -> native module (``<block>.processor.<name>.{down,up}.weight``)
XLABS = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
         "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1_qkv", "proj_lora": "linear2"}


def flux_blocks(cfg: dict) -> list[str]:
    return [f"double_blocks.{i}" for i in range(cfg["double"])] + [f"single_blocks.{i}" for i in range(cfg["single"])]


_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)[._](\d+)[._]")
_BLOCK_NATIVE = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def flux_block_of(path: str) -> str | None:
    """``double_blocks.3``/``single_blocks.7`` for a module path of either tree (dots or kohya ``_``)."""
    m = _BLOCK.match(path)
    if m is None:
        return None
    return f"{_BLOCK_NATIVE.get(m.group(1), m.group(1))}.{m.group(2)}"


_LORA_NAMES = (re.compile(r"^lora_unet_(double_blocks|single_blocks)_"),
               re.compile(r"^lora_unet_single_transformer_blocks_\d+_(proj_mlp|attn_to_q)"))

FLUX = Family(
    name="flux", label="Flux.1", markers={**NATIVE_MARKERS, **DIFFUSERS_MARKERS}, config=flux_config,
    layer_list=flux_layers, window_list=flux_windows,
    text_encoders=(TextEncoder("clip_l", ("lora_te1_", "lora_te_"), "text_encoder"),
                   TextEncoder("t5", ("lora_te3_", "lora_te2_"), "text_encoder_2")),
    blocks=flux_blocks, block_of=flux_block_of, excludes=(_APPROX, *_FLUX2), lora_patterns=_LORA_NAMES,
)

CHROMA = Family(
    name="chroma", label="Chroma", markers={**NATIVE_MARKERS, **DIFFUSERS_MARKERS}, config=flux_config,
    layer_list=flux_layers, window_list=flux_windows,
    text_encoders=(TextEncoder("t5", ("lora_te3_", "lora_te2_", "lora_te1_", "lora_te_"), "text_encoder"),),
    blocks=flux_blocks, block_of=flux_block_of, requires={"native": (_APPROX,), "diffusers": (_APPROX,)},
    lora_patterns=_LORA_NAMES,
)
