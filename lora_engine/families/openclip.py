"""The OpenCLIP text encoders as ldm/sgm hold them (SD2's OpenCLIP-H, SDXL's OpenCLIP-G): their native
tree and its correspondence to the HF-CLIP tree (``CLIPTextModel``) that LoRA files name.

kohya rebuilds OpenCLIP as ``CLIPTextModel``, so LoRA files use HF paths (the :class:`Layer` s'
"diffusers" side here is the transformers tree). q/k/v live fused in ``attn.in_proj_weight``
(``nn.MultiheadAttention``), stacked on dim 0 in that order, each ``width`` rows (the model's
width, from its config: ``ln_1``): ``q_proj`` = rows ``[0, w)``, ``k_proj`` = ``[w, 2w)``,
``v_proj`` = ``[2w, 3w)``, same for ``in_proj_bias``. Facts from diffusers ``convert_open_clip_checkpoint``
(the tests' oracle).

``text_projection`` is stored transposed (``(width, proj)`` vs HF's Linear ``(proj, width)``), which
a row/col-free Target cannot express, so it is not declared.
"""
from __future__ import annotations

from collections.abc import Mapping

from .base import FamilyMismatch, Layer, count_blocks, rows_of, same, stacked

# Per-layer OpenCLIP child -> HF child.
LAYER_RENAMES: dict[str, str] = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}
TOP_RENAMES: dict[str, str] = {
    "ln_final": "text_model.final_layer_norm",
    "token_embedding": "text_model.embeddings.token_embedding",
}
FUSED_ORDER = ("q_proj", "k_proj", "v_proj")
FUSED_PARAM = "in_proj_weight"  # of ``transformer.resblocks.N.attn``; its bias is ``in_proj_bias``
MARKER = f"transformer.resblocks.0.attn.{FUSED_PARAM}"  # a parameter only an OpenCLIP tower has
POSITIONAL = ("positional_embedding", "text_model.embeddings.position_embedding")  # a bare parameter


def openclip_config(shapes: Mapping[str, tuple]) -> dict:
    """Width and depth of an OpenCLIP tower (relative keys); the fused q/k/v must be 3 widths high."""
    width = rows_of(shapes, "transformer.resblocks.0.ln_1.weight", "ln_final.weight")
    cfg = {"width": width, "layers": count_blocks(shapes, "transformer.resblocks")}
    fused = rows_of(shapes, MARKER)
    if fused is not None and fused != 3 * (width or 0):
        raise FamilyMismatch(f"{MARKER} has {fused} rows, OpenCLIP's layout needs q+k+v = 3 x {width}")
    return cfg


def openclip_layers(cfg: dict) -> list[Layer]:
    """Every declared layer: native OpenCLIP path -> HF path (the tower keeps those it has)."""
    layers = [same(native, hf) for native, hf in TOP_RENAMES.items()]
    w = cfg["width"]
    for i in range(cfg["layers"]):
        native, hf = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        layers += [same(native + n, hf + h) for n, h in LAYER_RENAMES.items()]
        layers.append(stacked(native + "attn", [(f"{hf}self_attn.{p}", w) for p in FUSED_ORDER], FUSED_PARAM))
    return layers
