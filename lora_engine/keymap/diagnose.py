"""One line on why LoRA names matched nothing: usually a LoRA for another model family.

The family of a LoRA is guessed from names alone (shapes are the patcher's business):

- the declared diffusion-transformer families (``lora_engine.families``) by their own name patterns (Flux.1:
  ``double_blocks``/``single_blocks``/``single_transformer_blocks``; SD3: ``joint_blocks``); Flux.1/SD3 for
  diffusers names both have (a top-level ``transformer_blocks`` with ``add_q_proj``, ``ff_context``...);
- SDXL and SD1.x/SD2.x by the names declared in ``families.sd``: SDXL: a second text encoder
  (``lora_te2_``), ``label_emb``/``add_embedding``, transformer depth > 1 (``…_0_transformer_blocks_1``...),
  attention in the first up level (``up_blocks_0_attentions``, ``output_blocks_0..2_1`` other than SD1's
  upsampler ``output_blocks_2_1_conv``); SD1.x/SD2.x: a fourth level (``down_blocks_3``, ``up_blocks_3``,
  ``input_blocks_10/11``, ``output_blocks_9..11``) or attention in the first down level
  (``down_blocks_0_attentions``, ``input_blocks_1_1``/``_2_1``); SD2.x when the first text encoder has
  more layers than CLIP-L's 12.
- The family most names point to wins.
- OpenCLIP-native text-encoder names (``resblocks``, ``in_proj``, ``c_fc``) on an HF-CLIP model.
"""
from __future__ import annotations

import re

from ..families import FAMILIES, SD_FAMILIES
from ..families.sd import CLIP_L_LAYERS, SD1, SD1_SD2_NAMES, SD2

LABELS = {**{f.name: f.label for f in SD_FAMILIES}, "unknown": "unrecognised", **{f.name: f.label for f in FAMILIES}}
# a LoRA for one of these fits a model of the other (same tree)
_SAME_TREE = {"Chroma": "Flux.1", "Flux.1": "Chroma"}

_FAMILY_RULES: tuple[tuple[str, re.Pattern], ...] = (
    # declared diffusion-transformer families first: their names are never SD's
    *((f.label, p) for f in FAMILIES if f.name != "chroma" for p in f.lora_patterns),
    # diffusers names shared by Flux.1 and SD3 (a top-level transformer_blocks: SD's are nested)
    ("Flux.1/SD3", re.compile(r"^lora_unet_transformer_blocks_\d+_(attn_add_|attn_to_add_out|ff_context|norm1_context)")),
    *((f.label, p) for f in SD_FAMILIES for p in f.lora_patterns),  # SDXL
    (f"{SD1.label}/{SD2.label}", SD1_SD2_NAMES),
)
_TE_LAYER = re.compile(r"^lora_te1?_text_model_encoder_layers_(\d+)_")
_OPENCLIP_NATIVE = re.compile(r"^lora_te\d?_.*(resblocks|in_proj|_c_fc|_c_proj|ln_final)")


def lora_family(names: list[str]) -> str | None:
    """Best guess of the family a LoRA was made for, from its (unmatched) names: the family whose
    rule the most names fit (ties: the first rule)."""
    hits: dict[str, int] = {}
    for family, rule in _FAMILY_RULES:
        hits[family] = hits.get(family, 0) + sum(1 for n in names if rule.search(n))
    best = max(hits, key=hits.get)
    if hits[best]:
        return best
    layers = [int(m.group(1)) for m in map(_TE_LAYER.match, names) if m]
    if layers and max(layers) >= CLIP_L_LAYERS:
        return SD2.label
    return None


def _matches_model(family: str, arch: str) -> bool:
    label = LABELS.get(arch, "")
    return label in family.split("/") or _SAME_TREE.get(label) in family.split("/")


_DIT_LABELS = {f.label for f in FAMILIES} | {"Flux.1/SD3"}


def foreign_family(keymap, names: list[str]) -> str | None:
    """The family a LoRA was made for when its unmatched names point to one other than the model's
    (e.g. ``"SDXL"`` on an SD1.x model, "Flux.1" on SD3), else None. A diffusion transformer on either
    side is always told; otherwise a model of unrecognised architecture is never called foreign."""
    family = lora_family(list(names))
    if family is None or _matches_model(family, keymap.architecture):
        return None
    if getattr(keymap, "family", None) is not None or family in _DIT_LABELS:
        return family
    if keymap.architecture not in LABELS or keymap.architecture == "unknown":
        return None
    return family


def _article(label: str) -> str:
    """"an SD1.x", "an SDXL" (the letters are spoken), "a Flux.1", "a Qwen-Image"."""
    return "an" if label.startswith(("SD", "A", "E", "I", "O", "U")) else "a"


def diagnose_unmatched(keymap, names: list[str]) -> str:
    """E.g. ``"SDXL LoRA on an SD1.x model: 412 keys matched no module (e.g. lora_te2_...)"``."""
    names = list(names)
    if not names:
        return "all keys matched"
    count = f"{len(names)} key{'s' if len(names) != 1 else ''} matched no module (e.g. {', '.join(names[:2])})"
    arch = LABELS.get(keymap.architecture, keymap.architecture)
    family = lora_family(names)
    if family is not None and not _matches_model(family, keymap.architecture):
        return f"{family} LoRA on {_article(arch)} {arch} model: {count}"
    te_names = [n for n in names if n.startswith("lora_te")]
    if te_names and not keymap.te_namings:
        return f"text-encoder keys but this model part has no text encoder: {count}"
    if len(te_names) < len(names) and keymap.unet_naming is None:
        return f"UNet keys but this model part has no UNet: {count}"
    if any(_OPENCLIP_NATIVE.search(n) for n in te_names) and "openclip" not in keymap.te_namings:
        return f"text-encoder keys for OpenCLIP on a CLIP-L model: {count}"
    return count
