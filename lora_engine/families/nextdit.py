"""NextDiT families: Z-Image (Base, Turbo: one tree) and Lumina-Image 2.0. Both native trees are NextDiT's
(the same names, Lumina 2 modulates with ``adaLN_modulation.1``, Z-Image with ``.0``); the diffusers trees differ.

Z-Image:
Native (the released checkpoint, ComfyUI's NextDiT) -> diffusers ``ZImageTransformer2DModel``. Every block of
``layers.N``, ``noise_refiner.N`` and ``context_refiner.N`` (the latter without modulation) has one fused
attention input, q = heads · head_dim rows then k and v of kv_heads · head_dim rows each (grouped heads; q is
the width the output projection reads, kv the rest halved, never the fused height / 3):

- ``attention.qkv`` = ``attention.[to_q; to_k; to_v]``, ``attention.out`` = ``attention.to_out.0``,
  ``attention.{q,k}_norm`` = ``attention.norm_{q,k}``;
- ``feed_forward.w1/w2/w3`` (SwiGLU), ``attention_norm{1,2}``, ``ffn_norm{1,2}``, ``adaLN_modulation.0``: same names;
- ``x_embedder`` = ``all_x_embedder.2-1``, ``final_layer.{linear,adaLN_modulation.1}`` = ``all_final_layer.2-1.…``,
  ``cap_embedder.{0,1}``, ``t_embedder.mlp.{0,2}``: same names.

LoRA files: ai-toolkit ``diffusion_model.layers.0.attention.to_q.lora_A``, diffusers/PEFT ``transformer.…``,
DiffSynth bare keys, ``.lora_A.default.weight``, musubi-tuner ``lora_unet_layers_0_attention_to_q`` (its
flattened names built from this declaration), LyCORIS ``lycoris_…``. Text encoder: Qwen3; trainers write
transformer LoRAs only. Facts from diffusers ``convert_z_image_transformer_checkpoint_to_diffusers`` (the tests'
oracle), ``transformer_z_image.py`` and ComfyUI ``z_image_to_diffusers``.

Lumina 2 -> diffusers ``Lumina2Transformer2DModel`` (24 q heads, 8 kv heads of 96 in the released model):
``attention.qkv`` = ``attn.[to_q; to_k; to_v]``, ``attention.out`` = ``attn.to_out.0``, ``attention.{q,k}_norm`` =
``attn.norm_{q,k}``, ``feed_forward.w{1,2,3}`` = ``feed_forward.linear_{1,2,3}``, ``adaLN_modulation.1`` =
``norm1.linear``, ``attention_norm1`` = ``norm1.norm`` (``norm1`` in the unmodulated context refiner),
``attention_norm2`` = ``norm2``; ``cap_embedder.{0,1}`` = ``time_caption_embed.caption_embedder.{0,1}``,
``t_embedder.mlp.{0,2}`` = ``time_caption_embed.timestep_embedder.linear_{1,2}``, ``final_layer.adaLN_modulation.1``
/ ``final_layer.linear`` = ``norm_out.linear_1`` / ``norm_out.linear_2``. Text encoder Gemma 2 (kohya's
``lora_te_`` LoRAs on it are not mapped: one line). Facts from diffusers ``convert_lumina2_to_diffusers`` (oracle).
"""
from __future__ import annotations

import re

from .base import Family, FamilyMismatch, Layer, count_blocks, rows_of, same, stacked

_STACKS = ("layers", "noise_refiner", "context_refiner")
_FINAL = "all_final_layer.2-1."


def _widths(shapes, naming: str, b: str, attn: str = "attention.") -> tuple[int | None, int | None, int | None]:
    """(head_dim, q rows, k = v rows) of block ``b`` (e.g. ``layers.0.``); ``attn``: the diffusers attention path."""
    if naming == "native":
        head_dim = rows_of(shapes, b + "attention.q_norm.weight")
        out = shapes.get(b + "attention.out.weight")
        qkv = rows_of(shapes, b + "attention.qkv.weight")
        if out is None or qkv is None:
            return head_dim, None, None
        q = int(out[1])
        if (qkv - q) % 2 or qkv <= q:
            raise FamilyMismatch(f"{b}attention.qkv has {qkv} rows: not q ({q}, the output projection's input) + 2·kv")
        return head_dim, q, (qkv - q) // 2
    return (rows_of(shapes, b + attn + "norm_q.weight"), rows_of(shapes, b + attn + "to_q.weight"),
            rows_of(shapes, b + attn + "to_k.weight"))


def _config(shapes, naming: str, embedder: str, attn: str, what: str) -> dict:
    inner = rows_of(shapes, embedder + ".weight")
    counts = {s: count_blocks(shapes, s) for s in _STACKS}
    if inner is None or not counts["layers"]:
        raise FamilyMismatch(f"no patch embedding or layers: not a {what} tree")
    head_dim, q, kv = _widths(shapes, naming, "layers.0.", attn)
    if q is None or kv is None:
        raise FamilyMismatch(f"layers.0 has no attention projections: not a {what} tree")
    if head_dim is not None and (q % head_dim or kv % head_dim):
        raise FamilyMismatch(f"attention widths q={q}, kv={kv} are not multiples of the head size {head_dim}")
    heads = None if head_dim is None else q // head_dim
    kv_heads = None if head_dim is None else kv // head_dim
    return {"inner": inner, "head_dim": head_dim, "heads": heads, "kv_heads": kv_heads, "q": q, "kv": kv, **counts}


def z_image_config(shapes, naming: str) -> dict:
    return _config(shapes, naming, "x_embedder" if naming == "native" else "all_x_embedder.2-1", "attention.", "Z-Image")


def _block(b: str, q: int, kv: int, modulated: bool) -> list[Layer]:
    a = b + "attention."
    layers = [stacked(a + "qkv", [(a + "to_q", q), (a + "to_k", kv), (a + "to_v", kv)]),
              same(a + "out", a + "to_out.0"), same(a + "q_norm", a + "norm_q"), same(a + "k_norm", a + "norm_k")]
    layers += [same(b + n, b + n) for n in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm1",
                                            "attention_norm2", "ffn_norm1", "ffn_norm2")]
    if modulated:
        layers.append(same(b + "adaLN_modulation.0", b + "adaLN_modulation.0"))
    return layers


_TOP = [("x_embedder", "all_x_embedder.2-1"), ("final_layer.linear", _FINAL + "linear"),
        ("final_layer.adaLN_modulation.1", _FINAL + "adaLN_modulation.1")] + [
    (n, n) for n in ("cap_embedder.0", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2")]


def _layers(top, block, cfg: dict) -> list[Layer]:
    """The top-level layers, then every block of the main stack and the refiners (the context refiner
    has no adaLN modulation)."""
    layers = [same(n, d) for n, d in top]
    for stack in _STACKS:
        for i in range(cfg[stack]):
            layers += block(f"{stack}.{i}.", cfg["q"], cfg["kv"], stack != "context_refiner")
    return layers


def z_image_layers(cfg: dict) -> list[Layer]:
    return _layers(_TOP, _block, cfg)


def z_image_blocks(cfg: dict) -> list[str]:
    return [f"{s}.{i}" for s in ("noise_refiner", "context_refiner", "layers") for i in range(cfg[s])]


_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)[._](\d+)[._]")


def z_image_block_of(path: str) -> str | None:
    m = _BLOCK.match(path)
    return None if m is None else f"{m.group(1)}.{m.group(2)}"


Z_IMAGE = Family(
    name="z_image", label="Z-Image",
    markers={"layers.0.attention.qkv.weight": "native", "all_x_embedder.2-1.weight": "diffusers"},
    config=z_image_config, layer_list=z_image_layers, text_encoders=(), blocks=z_image_blocks,
    block_of=z_image_block_of,
    # Lumina 2's native tree has the same fused attention; Z-Image's modulation is ``adaLN_modulation.0``
    requires={"native": ("layers.0.adaLN_modulation.0.",)},
    lora_patterns=(re.compile(r"^lora_unet_(layers|noise_refiner|context_refiner)_\d+_(attention_to_|adaLN_modulation_0)"),
                   re.compile(r"^lora_unet_all_(x_embedder|final_layer)_2-1")),
)


def lumina2_config(shapes, naming: str) -> dict:
    return _config(shapes, naming, "x_embedder", "attn.", "Lumina 2")


def _lumina2_block(b: str, q: int, kv: int, modulated: bool) -> list[Layer]:
    a, d = b + "attention.", b + "attn."
    layers = [stacked(a + "qkv", [(d + "to_q", q), (d + "to_k", kv), (d + "to_v", kv)]),
              same(a + "out", d + "to_out.0"), same(a + "q_norm", d + "norm_q"), same(a + "k_norm", d + "norm_k"),
              same(b + "attention_norm1", b + ("norm1.norm" if modulated else "norm1")),
              same(b + "attention_norm2", b + "norm2"), same(b + "ffn_norm1", b + "ffn_norm1"),
              same(b + "ffn_norm2", b + "ffn_norm2")]
    layers += [same(f"{b}feed_forward.w{j}", f"{b}feed_forward.linear_{j}") for j in (1, 2, 3)]
    if modulated:
        layers.append(same(b + "adaLN_modulation.1", b + "norm1.linear"))
    return layers


_TCE = "time_caption_embed."
_LUMINA2_TOP = [("x_embedder", "x_embedder"), ("cap_embedder.0", _TCE + "caption_embedder.0"),
                ("cap_embedder.1", _TCE + "caption_embedder.1"), ("t_embedder.mlp.0", _TCE + "timestep_embedder.linear_1"),
                ("t_embedder.mlp.2", _TCE + "timestep_embedder.linear_2"),
                ("final_layer.adaLN_modulation.1", "norm_out.linear_1"), ("final_layer.linear", "norm_out.linear_2")]


def lumina2_layers(cfg: dict) -> list[Layer]:
    return _layers(_LUMINA2_TOP, _lumina2_block, cfg)


LUMINA2 = Family(
    name="lumina2", label="Lumina 2",
    markers={"layers.0.attention.qkv.weight": "native", "layers.0.feed_forward.linear_1.weight": "diffusers"},
    config=lumina2_config, layer_list=lumina2_layers, text_encoders=(), blocks=z_image_blocks,
    block_of=z_image_block_of, requires={"native": ("layers.0.adaLN_modulation.1.",)},
    lora_patterns=(re.compile(r"^lora_unet_(layers|noise_refiner|context_refiner)_\d+_(attn_|feed_forward_linear_|norm1_linear)"),
                   re.compile(r"^lora_unet_(layers|noise_refiner|context_refiner)_\d+_adaLN_modulation_1"),
                   re.compile(r"^lora_unet_time_caption_embed_")),
)
