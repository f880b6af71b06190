"""The diffusers <-> ldm/sgm correspondence of the SD UNet, derived from the module tree.

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
``SpatialTransformer`` share ``norm``, ``proj_in``, ``transformer_blocks.N.*``, ``proj_out``);
resnets and samplers differ by the tables below. Facts from diffusers
``loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``), which the tests use as oracle.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

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
ATTENTION_RENAMES: dict[str, str] = {}  # identical sub-paths

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

_RENAMES = {"resnet": RESNET_RENAMES, "attention": ATTENTION_RENAMES,
            "down": DOWNSAMPLER_RENAMES, "up": UPSAMPLER_RENAMES}
_INVERSE = {kind: {v: k for k, v in table.items()} for kind, table in _RENAMES.items()}
_DIRECT_INVERSE = {v: k for k, v in DIRECT.items()}


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


# ---------------------------------------------------------------- path translation
def _rename(sub: str, table: dict[str, str]) -> str | None:
    """Rename the leading child of ``sub`` by ``table`` (longest key first); identity if table is empty."""
    if not table:
        return sub
    for old in sorted(table, key=len, reverse=True):
        if sub == old or sub.startswith(old + "."):
            return table[old] + sub[len(old):]
    return None


class UNetNaming:
    """Translate module paths between the two namings of one UNet (built once)."""

    def __init__(self, units: list[Unit]):
        self.units = tuple(units)
        self._by_diffusers = {u.diffusers: u for u in units}
        self._by_ldm = {u.ldm: u for u in units}

    @classmethod
    def from_paths(cls, paths, naming: str) -> "UNetNaming":
        layout = layout_from_diffusers if naming == "diffusers" else layout_from_ldm
        return cls(layout(paths))

    def to_ldm(self, path: str) -> str | None:
        """``down_blocks.0.resnets.1.conv1`` -> ``input_blocks.2.0.in_layers.2``; None if unknown."""
        return self._translate(path, self._by_diffusers, DIRECT, _RENAMES, "ldm")

    def to_diffusers(self, path: str) -> str | None:
        """``input_blocks.2.0.in_layers.2`` -> ``down_blocks.0.resnets.1.conv1``; None if unknown."""
        return self._translate(path, self._by_ldm, _DIRECT_INVERSE, _INVERSE, "diffusers")

    @staticmethod
    def _translate(path: str, units: dict[str, Unit], direct: dict[str, str], renames: dict, to: str) -> str | None:
        if path in direct:
            return direct[path]
        parts = path.split(".")
        for n in range(len(parts) - 1, 0, -1):
            unit = units.get(".".join(parts[:n]))
            if unit is None:
                continue
            sub = _rename(".".join(parts[n:]), renames[unit.kind])
            if sub is None:
                return None
            return f"{getattr(unit, to)}.{sub}"
        return None
