"""Stable Diffusion 1.x, 2.x and SDXL: one UNet tree (``sd_unet``), their text encoders, their blocks.

Native tree: ldm/sgm names (``input_blocks.4.1.proj_in``; A1111, ComfyUI, kohya SDXL files); diffusers tree:
``UNet2DConditionModel`` (``down_blocks.1.attentions.0.proj_in``; kohya SD1/SD2 files, PEFT). Every layer is one
whole module in both trees (see ``sd_unet``).

Which family a model is, from its parameters alone (the whole model: a part may lack its UNet):

- SDXL: two text encoders, or a UNet with ``add_embedding``/``label_emb`` (the refiner has one encoder).
- SD2.x: ``proj_in`` is a Linear (2-D weight) or the text encoder is OpenCLIP (fused MHA, ComfyUI ``clip_h``).
- SD1.x: ``proj_in`` is a 1x1 conv, one CLIP text encoder.

Text encoders are told by position (kohya ``lora_te_``/``lora_te1_`` the first, ``lora_te2_`` the second):
SD1 CLIP-L, SD2 OpenCLIP-H (``openclip``), SDXL CLIP-L + OpenCLIP-G.

Blocks are sd-webui-lora-block-weight's (LBW): ``IN00`` (``conv_in``), one ``INnn`` per resnet(+attention)
pair and per downsampler, ``M00`` (the middle block), one ``OUTnn`` per up layer (the upsampler joins the last
one of its level); ``time_embed``, ``label_emb`` and ``out`` are in no block. diffusers names map to
LBW's ldm names by a closed form (layers_per_block = 2, which holds for SD1, SD2 and SDXL). Facts from
hako-mikan/sd-webui-lora-block-weight (b403cb7, ``scripts/lora_block_weight.py``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from .base import Family, TextEncoder
from .sd_unet import DIRECT, RESNET_RENAMES, unet_config, unet_layers

# the UNet's marker parameter per naming (relative to its root)
UNET_MARKERS = {"time_embedding.linear_1.weight": "diffusers", "time_embed.0.weight": "ldm"}

# LBW's blocks of the full-size models, and those holding attention (the blocks a 17- / 12-entry LoRA vector names)
SD_BLOCKS = tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
SD_ATTENTION_BLOCKS = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12))
SDXL_BLOCKS = tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9))
SDXL_ATTENTION_BLOCKS = ("IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6))


def sd_blocks(cfg: dict) -> list[str]:
    """LBW block ids of a UNet of this config, in order."""
    ldm = [u.ldm for u in cfg["units"]]
    ins = {int(p.split(".")[1]) for p in ldm if p.startswith("input_blocks.")} | {0}
    outs = {int(p.split(".")[1]) for p in ldm if p.startswith("output_blocks.")}
    return [f"IN{i:02d}" for i in sorted(ins)] + ["M00"] + [f"OUT{i:02d}" for i in sorted(outs)]


# ---- UNet module path -> LBW block (the closed form; the module's model is not needed)

# The diffusers -> ldm tables of the tree, in underscore form (kohya names have no dots).
_RESNET_PARTS = {k: v.replace(".", "_") for k, v in RESNET_RENAMES.items()}
_DIFFUSERS_TOP = {k.replace(".", "_"): v.replace(".", "_") for k, v in DIRECT.items()}
_DOWN_RE = re.compile(r"down_blocks_(\d+)_(resnets|attentions)_(\d+)(_.*|)\Z")
_DOWNSAMPLE_RE = re.compile(r"down_blocks_(\d+)_downsamplers_0_conv(_.*|)\Z")
_UP_RE = re.compile(r"up_blocks_(\d+)_(resnets|attentions)_(\d+)(_.*|)\Z")
_UPSAMPLE_RE = re.compile(r"up_blocks_(\d+)_upsamplers_0_conv(_.*|)\Z")
_MID_RE = re.compile(r"mid_block_(resnets|attentions)_(\d+)(_.*|)\Z")


def _resnet_rest(rest: str) -> str:
    for part, ldm in _RESNET_PARTS.items():
        if rest == "_" + part or rest.startswith("_" + part + "_"):
            return "_" + ldm + rest[len(part) + 1:]
    return rest


def ldm_unet_path(path: str) -> str:
    """A UNet module path with underscores, diffusers layout -> ldm layout (ldm input unchanged).

    The upsampler's sub-index (``output_blocks_N_1`` or ``_2``) depends on the model; 1 is used
    for ``up_blocks_0`` and 2 otherwise (true for SD1/SD2). Block ids are exact either way."""
    for pat, fn in (
        (_DOWN_RE, lambda m: f"input_blocks_{3 * int(m[1]) + int(m[3]) + 1}_{0 if m[2] == 'resnets' else 1}"),
        (_UP_RE, lambda m: f"output_blocks_{3 * int(m[1]) + int(m[3])}_{0 if m[2] == 'resnets' else 1}"),
    ):
        m = pat.match(path)
        if m:
            rest = m[4]
            return fn(m) + (_resnet_rest(rest) if m[2] == "resnets" else rest)
    m = _MID_RE.match(path)
    if m:
        idx = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"middle_block_{idx}" + (_resnet_rest(m[3]) if m[1] == "resnets" else m[3])
    m = _DOWNSAMPLE_RE.match(path)
    if m:
        return f"input_blocks_{3 * int(m[1]) + 3}_0_op" + m[2]
    m = _UPSAMPLE_RE.match(path)
    if m:
        return f"output_blocks_{3 * int(m[1]) + 2}_{1 if m[1] == '0' else 2}_conv" + m[2]
    for d, ldm in _DIFFUSERS_TOP.items():
        if path == d or path.startswith(d + "_"):
            return ldm + path[len(d):]
    return path


_IN_RE = re.compile(r"input_blocks_(\d+)(?:_|\Z)")
_OUT_RE = re.compile(r"output_blocks_(\d+)(?:_|\Z)")


def lbw_block(ldm_path: str) -> str | None:
    """The LBW block of an ldm module path with underscores (``input_blocks_4_1_proj_in`` -> ``IN04``), or None."""
    m = _IN_RE.match(ldm_path)
    if m and int(m[1]) < 12:
        return f"IN{int(m[1]):02d}"
    if ldm_path.startswith("middle_block_") or ldm_path == "middle_block":
        return "M00"
    m = _OUT_RE.match(ldm_path)
    if m and int(m[1]) < 12:
        return f"OUT{int(m[1]):02d}"
    return None


def sd_block_of(path: str) -> str | None:
    """The LBW block of a UNet module path of either tree (dots or kohya ``_``), or None."""
    return lbw_block(ldm_unet_path(path.replace(".", "_")))


# ---- which family a model is

def _unet_family(shapes: Mapping[str, tuple]) -> str | None:
    if any(k.startswith(("add_embedding.", "label_emb.")) for k in shapes):
        return "sdxl"
    proj = next((shape for k, shape in shapes.items() if k.endswith("proj_in.weight")), None)
    if proj is None:
        return None
    return "sd2" if len(proj) == 2 else "sd1"


def _te_family(tes: list) -> str | None:
    if len(tes) >= 2:
        return "sdxl"
    if len(tes) == 1:
        te = tes[0]
        return "sd2" if te.naming == "openclip" or te.prefix.startswith("clip_h.") else "sd1"
    return None


def sd_family(unet_shapes: Mapping[str, tuple] | None, tes: list) -> Family | None:
    """SD1, SD2 or SDXL from the UNet's (relative) parameter shapes and the CLIP text-encoder roots
    (anything with ``naming`` and ``prefix``); the UNet decides when present. None: unrecognised."""
    name = "sdxl" if len(tes) >= 2 else None
    if name is None and unet_shapes is not None:
        name = _unet_family(unet_shapes)
    name = name or _te_family(tes)
    return BY_NAME.get(name)


# ---- the declarations

# names only a LoRA for these families has (diagnosis); SD1 and SD2 share their UNet's names
SDXL_NAMES = re.compile(r"^lora_te2_|^lora_unet_(label_emb|add_embedding)_|\d_transformer_blocks_[1-9]"
                        r"|^lora_unet_(up_blocks_0_attentions|output_blocks_[0-2]_1_(?!conv))")
# a first text encoder with a layer at or above CLIP-L's count is OpenCLIP-H's (SD2: 23 layers)
CLIP_L_LAYERS = 12
SD1_SD2_NAMES = re.compile(r"^lora_unet_(down_blocks_3|up_blocks_3|input_blocks_1[01]_|output_blocks_(9|10|11)_"
                           r"|down_blocks_0_attentions|input_blocks_[12]_1_)")

_UNET = dict(markers=UNET_MARKERS, config=unet_config, layer_list=unet_layers, blocks=sd_blocks, block_of=sd_block_of,
             te_by_position=True)

SD1 = Family(name="sd1", label="SD1.x", text_encoders=(TextEncoder("clip_l", ("lora_te_", "lora_te1_"), "text_encoder"),),
             widths={"context": 768, "te": 768, "te_mlp": 3072}, kohya_naming="diffusers", **_UNET)
SD2 = Family(name="sd2", label="SD2.x", text_encoders=(TextEncoder("clip_h", ("lora_te_", "lora_te1_"), "text_encoder"),),
             widths={"context": 1024, "te": 1024, "te_mlp": 4096}, kohya_naming="diffusers", **_UNET)
SDXL = Family(name="sdxl", label="SDXL",
              text_encoders=(TextEncoder("clip_l", ("lora_te1_", "lora_te_"), "text_encoder"),
                             TextEncoder("clip_g", ("lora_te2_",), "text_encoder_2")),
              widths={"context": 2048}, lora_patterns=(SDXL_NAMES,), kohya_naming="ldm", **_UNET)

SD_FAMILIES = (SD1, SD2, SDXL)
BY_NAME = {f.name: f for f in SD_FAMILIES}
