"""The SD1/SD2/SDXL UNet tree: the diffusers <-> ldm/sgm correspondence, from the module tree.

``unet_config(shapes, naming)`` reads the tree's units (and each attention's depth) from either
naming; ``unet_layers(config)`` lists every targetable layer under both names (the family
declarations in ``families.sd`` use them).

Both namings describe the same layers in the same order; only the grouping differs:

- diffusers groups by level: ``down_blocks.{b}.{resnets,attentions}.{j}``, ``downsamplers.0``;
  ``mid_block.{resnets,attentions}.{j}``; ``up_blocks.{b}.{resnets,attentions}.{j}``, ``upsamplers.0``.
- ldm/sgm numbers the sequential blocks: ``input_blocks.{i}.{0: resnet | op, 1: attention}``,
  ``middle_block.{k}`` (resnet, attention, resnet), ``output_blocks.{i}.{0: resnet, 1: attention,
  last: upsampler}``.

Walking one naming's blocks in order and counting gives the other naming. Nothing assumes a
number of levels, layers per block or where attention is present (SD1 has none in its last
down level, SDXL none in its first); the upsampler's slot follows from attention presence.

Inside a unit, attention sub-paths are identical in both namings (``Transformer2DModel`` and
``SpatialTransformer`` share ``ATTENTION_CHILDREN`` and, per transformer block, ``TRANSFORMER_CHILDREN``);
resnets and samplers differ by the tables below. A weighted module outside these declared layers
(a host's add-on inside an attention) keeps its own name only. Facts from diffusers
``loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``), which the tests use as oracle.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .base import Layer, count_blocks, same

# diffusers ResnetBlock2D child -> ldm ResBlock child.
RESNET_RENAMES: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
DOWNSAMPLER_RENAMES = {"conv": "op"}
UPSAMPLER_RENAMES = {"conv": "conv"}
# Targetable children of an attention unit (identical in both namings), and of each of its transformer blocks.
ATTENTION_CHILDREN = ("norm", "proj_in", "proj_out")
TRANSFORMER_CHILDREN = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2")

# Top-level layers outside the block structure (exceptions table).
DIRECT: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL (addition_embed_type="text_time")
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_RENAMES = {"resnet": RESNET_RENAMES, "down": DOWNSAMPLER_RENAMES, "up": UPSAMPLER_RENAMES}


@dataclass(frozen=True)
class Unit:
    """One block seen in both namings: ``kind`` picks the sub-path rename table."""

    kind: str  # "resnet" | "attention" | "down" | "up"
    diffusers: str
    ldm: str


# ---------------------------------------------------------------- from diffusers paths
_D_LEVEL = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.|$)")
_D_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.|$)")


def _diffusers_tree(paths) -> dict:
    """``{("down_blocks", b): {"resnets": {j}, "attentions": {j}, "downsamplers": {0}}, ("mid_block", 0): ...}``."""
    tree: dict = {}
    for p in paths:
        m = _D_LEVEL.match(p)
        if m:
            tree.setdefault((m.group(1), int(m.group(2))), {}).setdefault(m.group(3), set()).add(int(m.group(4)))
            continue
        m = _D_MID.match(p)
        if m:
            tree.setdefault(("mid_block", 0), {}).setdefault(m.group(1), set()).add(int(m.group(2)))
    return tree


def layout_from_diffusers(paths) -> list[Unit]:
    """Units of a diffusers-named UNet, given its module (or parameter) paths."""
    tree = _diffusers_tree(paths)
    units: list[Unit] = []
    i = 1  # input_blocks.0 is conv_in
    for b in sorted(k[1] for k in tree if k[0] == "down_blocks"):
        level = tree[("down_blocks", b)]
        for j in sorted(level.get("resnets", ())):
            units.append(Unit("resnet", f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0"))
            if j in level.get("attentions", ()):
                units.append(Unit("attention", f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1"))
            i += 1
        if level.get("downsamplers"):
            units.append(Unit("down", f"down_blocks.{b}.downsamplers.0", f"input_blocks.{i}.0"))
            i += 1
    mid = tree.get(("mid_block", 0), {})
    k = 0
    for j in sorted(mid.get("resnets", ())):  # resnet, attention, resnet, ...
        units.append(Unit("resnet", f"mid_block.resnets.{j}", f"middle_block.{k}"))
        k += 1
        if j in mid.get("attentions", ()):
            units.append(Unit("attention", f"mid_block.attentions.{j}", f"middle_block.{k}"))
            k += 1
    i = 0
    for b in sorted(k[1] for k in tree if k[0] == "up_blocks"):
        level = tree[("up_blocks", b)]
        resnets = sorted(level.get("resnets", ()))
        for j in resnets:
            has_attn = j in level.get("attentions", ())
            units.append(Unit("resnet", f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0"))
            if has_attn:
                units.append(Unit("attention", f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1"))
            if j == resnets[-1] and level.get("upsamplers"):
                units.append(Unit("up", f"up_blocks.{b}.upsamplers.0", f"output_blocks.{i}.{2 if has_attn else 1}"))
            i += 1
    return units


# ---------------------------------------------------------------- from ldm paths
_L_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.([^.]+)")
_L_MID = re.compile(r"^middle_block\.(\d+)\.([^.]+)")


def _slot_kind(children: set[str]) -> str:
    """What an ldm slot is, from its child names."""
    if "in_layers" in children or "out_layers" in children:
        return "resnet"
    if "op" in children:
        return "down"
    if "transformer_blocks" in children or "proj_in" in children:
        return "attention"
    if "conv" in children:
        return "up"
    return "unknown"


def _ldm_tree(paths) -> tuple[dict, dict]:
    """``({(part, i): {slot: kind}}, {k: kind})`` for input/output blocks and the middle block."""
    children: dict = {}
    mid_children: dict = {}
    for p in paths:
        m = _L_BLOCK.match(p)
        if m:
            children.setdefault((m.group(1), int(m.group(2))), {}).setdefault(int(m.group(3)), set()).add(m.group(4))
            continue
        m = _L_MID.match(p)
        if m:
            mid_children.setdefault(int(m.group(1)), set()).add(m.group(2))
    blocks = {key: {s: _slot_kind(c) for s, c in slots.items()} for key, slots in children.items()}
    mid = {k: _slot_kind(c) for k, c in mid_children.items()}
    return blocks, mid


def layout_from_ldm(paths) -> list[Unit]:
    """Units of an ldm/sgm-named UNet, given its module (or parameter) paths."""
    blocks, mid = _ldm_tree(paths)
    units: list[Unit] = []
    b = j = 0
    for i in sorted(k[1] for k in blocks if k[0] == "input_blocks" and k[1] > 0):
        slots = blocks[("input_blocks", i)]
        if slots.get(0) == "down":
            units.append(Unit("down", f"down_blocks.{b}.downsamplers.0", f"input_blocks.{i}.0"))
            b, j = b + 1, 0
            continue
        units.append(Unit("resnet", f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0"))
        if slots.get(1) == "attention":
            units.append(Unit("attention", f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1"))
        j += 1
    r = a = 0
    for k in sorted(mid):
        if mid[k] == "resnet":
            units.append(Unit("resnet", f"mid_block.resnets.{r}", f"middle_block.{k}"))
            r += 1
        elif mid[k] == "attention":
            units.append(Unit("attention", f"mid_block.attentions.{a}", f"middle_block.{k}"))
            a += 1
    b = j = 0
    for i in sorted(k[1] for k in blocks if k[0] == "output_blocks"):
        slots = blocks[("output_blocks", i)]
        units.append(Unit("resnet", f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0"))
        if slots.get(1) == "attention":
            units.append(Unit("attention", f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1"))
        up_slot = next((s for s, kind in slots.items() if kind == "up"), None)
        if up_slot is not None:
            units.append(Unit("up", f"up_blocks.{b}.upsamplers.0", f"output_blocks.{i}.{up_slot}"))
            b, j = b + 1, 0
        else:
            j += 1
    return units


# ---------------------------------------------------------------- the declaration
def unet_config(shapes: Mapping[str, tuple], naming: str) -> dict:
    """The tree's units (from either naming: ``"diffusers"`` or ``"ldm"``) and each attention unit's
    transformer depth, keyed by its diffusers path."""
    units = (layout_from_diffusers if naming == "diffusers" else layout_from_ldm)(shapes)
    own = "diffusers" if naming == "diffusers" else "ldm"
    depth = {u.diffusers: count_blocks(shapes, f"{getattr(u, own)}.transformer_blocks")
             for u in units if u.kind == "attention"}
    return {"units": units, "depth": depth}


def _children(unit: Unit, depth: Mapping[str, int]) -> list[tuple[str, str]]:
    """``(diffusers child, ldm child)`` of every targetable layer of a unit."""
    if unit.kind != "attention":
        return list(_RENAMES[unit.kind].items())
    subs = list(ATTENTION_CHILDREN) + [f"transformer_blocks.{n}.{c}" for n in range(depth[unit.diffusers])
                                       for c in TRANSFORMER_CHILDREN]
    return [(c, c) for c in subs]


def unet_layers(cfg: dict) -> list[Layer]:
    """Every targetable layer of a UNet of this config: ldm/sgm path as ``native``, the diffusers path
    as its one part (the model keeps those it has)."""
    layers = [same(ldm, d) for d, ldm in DIRECT.items()]
    for u in cfg["units"]:
        layers += [same(f"{u.ldm}.{ldm}", f"{u.diffusers}.{d}") for d, ldm in _children(u, cfg["depth"])]
    return layers


class UNetNaming:
    """Translate module paths between the two namings of one UNet (built once, from the declaration)."""

    def __init__(self, layers: list[Layer]):
        self._to_ldm = {layer.parts[0].diffusers: layer.native for layer in layers}
        self._to_diffusers = {layer.native: layer.parts[0].diffusers for layer in layers}

    @classmethod
    def from_paths(cls, paths, naming: str) -> "UNetNaming":
        return cls(unet_layers(unet_config(paths, naming)))

    def to_ldm(self, path: str) -> str | None:
        """``down_blocks.0.resnets.1.conv1`` -> ``input_blocks.2.0.in_layers.2``; None if unknown."""
        return self._to_ldm.get(path)

    def to_diffusers(self, path: str) -> str | None:
        """``input_blocks.2.0.in_layers.2`` -> ``down_blocks.0.resnets.1.conv1``; None if unknown."""
        return self._to_diffusers.get(path)
