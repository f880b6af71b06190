"""Convert Flux.1 / Chroma / SD3 LoRAs between the kohya (``lora_unet_<native path>``), ComfyUI-native
(``diffusion_model.<native path>``) and diffusers (``transformer.<diffusers path>.lora_A/B``) dialects.

The two trees differ in fused layers (Flux ``qkv`` = ``to_q; to_k; to_v``, ``linear1`` = ``…; proj_mlp``,
SD3 ``qkv``) and in row order (the final adaLN's ``[shift; scale]`` against ``[scale; shift]``). The family
declaration says which native rows are which diffusers rows (:class:`lora_engine.families.base.Part`); a
LoRA module ΔW = s·U·D (s = α/r) is moved through that map exactly:

- onto one layer of the other tree: U's rows are placed where the map puts them (zero rows where the
  module does not reach), D and α unchanged; a fused module split onto q, k, v shares D and gives each
  piece its rows of U. Rank columns whose rows of U are all zero in a piece are dropped with their rows
  of D (so a kohya ``split_qkv`` file, whose U is block-diagonal, splits D too) and α keeps s = α/r;
- several modules onto one layer (``to_q``, ``to_k``, ``to_v`` onto ``qkv``): U = [U₁ | U₂ | U₃] placed
  (block-diagonal), D = [D₁; D₂; D₃], rank Σr, α = s·Σr. Exact only when every piece has the same s;
  otherwise the conversion is refused with one line (the file stays loadable as it is).

Row counts come from the model's config: from a reference model when given (``--reference``), else from
the LoRA's own shapes (the width of an attention projection's input; Flux's mlp from ``linear1``/``proj_mlp``
or 4× the width; SD3's depth = width / 64 as in every released SD3/3.5 model).

Text-encoder modules move between the family's kohya prefixes (``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G,
``lora_te3_`` T5) and diffusers components (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from ..errors import ToolError
from ..families import BY_NAME, Family
from ..families.base import Layer
from ..families.lora_names import AmbiguousFamily, family_from_names
from ..formats.writer import LoraTensors
from ..keymap.target import underscored

UNET = "lora_unet_"
_BLOCK_NUM = re.compile(r"(?:double_blocks|single_blocks|joint_blocks|transformer_blocks|single_transformer_blocks"
                        r"|distilled_guidance_layer_layers)_(\d+)_")


# ------------------------------------------------------------------------------------------- family, config

def _blocks(rest: list[str], *prefixes: str) -> int:
    found = [int(m.group(1)) for r in rest if (m := _BLOCK_NUM.match(r)) and r.startswith(prefixes)]
    return max(found) + 1 if found else 0


def _width(modules: dict[str, LoraTensors], ends: tuple[str, ...]) -> int | None:
    for name, m in modules.items():
        if name.startswith(UNET) and name.endswith(ends):
            return int(m.down.reshape(m.down.shape[0], -1).shape[1])
    return None


def _rows(modules: dict[str, LoraTensors], ends: tuple[str, ...]) -> int | None:
    for name, m in modules.items():
        if name.startswith(UNET) and name.endswith(ends):
            return int(m.up.shape[0])
    return None


def config_from_lora(family: Family, modules: dict[str, LoraTensors]) -> dict:
    """The row-layout config of a Flux/Chroma/SD3 model the LoRA was made for, from its shapes."""
    rest = [n[len(UNET):] for n in modules if n.startswith(UNET)]
    attn_in = ("_qkv", "_attn_proj", "_to_q", "_to_k", "_to_v", "_add_q_proj", "_add_k_proj", "_add_v_proj",
               "_to_out_0", "_linear1", "_qkv_lora", "_norm1_linear", "_mod_lin")
    inner = _width(modules, attn_in)
    if inner is None:
        raise ToolError(f"cannot tell the {family.label} model's width from this LoRA (no attention or modulation "
                        "module); give --reference MODEL")
    if family.name == "sd3":
        depth = inner // 64 if inner % 64 == 0 else 0
        if depth < _blocks(rest, "joint_blocks", "transformer_blocks"):
            raise ToolError(f"cannot tell the SD3 model's depth from this LoRA (width {inner}); give --reference MODEL")
        return {"inner": inner, "q": inner, "head_dim": None, "heads": None, "depth": depth}
    mlp = _rows(modules, ("_proj_mlp", "_img_mlp_0", "_txt_mlp_0", "_ff_net_0_proj", "_ff_context_net_0_proj"))
    lin1 = _rows(modules, ("_linear1",))
    if mlp is None:
        mlp = lin1 - 3 * inner if lin1 is not None else 4 * inner
    return {"inner": inner, "head_dim": inner, "heads": 1, "kv_heads": 1, "mlp": mlp,
            "double": _blocks(rest, "double_blocks", "transformer_blocks"),
            "single": _blocks(rest, "single_blocks", "single_transformer_blocks"),
            "approximator": _blocks(rest, "distilled_guidance_layer_layers")}


def config_from_reference(named_shapes) -> tuple[Family, dict]:
    from ..keymap.roots import find_roots

    root, _ = find_roots(named_shapes)
    family = BY_NAME.get(root.family) if root is not None and root.family else None
    if family is None:
        raise ToolError("the reference model is not a Flux.1, Chroma or SD3 model")
    return family, family.config(root.shapes, root.naming)


# ------------------------------------------------------------------------------------- placement of rows

@dataclass
class Placed:
    """One source module's ΔW on the rows of one native layer: ``up`` is the layer's full height (zero
    rows where the module does not reach)."""

    source: str
    layer: Layer
    up: torch.Tensor
    lora: LoraTensors
    identity: bool  # the module is the native layer itself, rows as they are


def _native_height(layer: Layer, up_rows: int) -> int:
    ends = [p.native_rows[1] for p in layer.parts if p.native_rows is not None]
    return max(ends) if ends else up_rows


def _diffusers_height(layer: Layer, dpath: str, native_height: int) -> int:
    parts = [p for p in layer.parts if p.diffusers == dpath]
    if all(p.diffusers_rows is not None for p in parts):
        return max(p.diffusers_rows[1] for p in parts)
    p = parts[0]
    return native_height if p.native_rows is None else p.native_rows[1] - p.native_rows[0]


class Layout:
    """The family's layers of one config, looked up by either tree's kohya-underscored path."""

    def __init__(self, family: Family, cfg: dict):
        self.family, self.cfg = family, cfg
        layers = family.layers(cfg)
        self.native: dict[str, Layer] = {underscored(l.native): l for l in layers}
        self.diffusers: dict[str, tuple[Layer, str]] = {}
        for l in layers:
            for p in l.parts:
                self.diffusers.setdefault(underscored(p.diffusers), (l, p.diffusers))
        self.windows = {underscored(w.name): w for w in family.windows(cfg, layers)}

    def place(self, name: str, m: LoraTensors) -> Placed:
        """The module's ΔW rows on its native layer."""
        path = name[len(UNET):]
        o = m.up.shape[0]
        if path in self.native:
            layer = self.native[path]
            h = _native_height(layer, o)
            if h != o:
                raise ToolError(f"{name}: {o} output rows, the {self.family.label} layer has {h}")
            return Placed(name, layer, m.up, m, True)
        if path in self.windows:
            w = self.windows[path]
            h = _native_height(w.layer, o)
            return Placed(name, w.layer, _put(m.up, h, [(w.rows, (0, o))], name), m, False)
        if path in self.diffusers:
            layer, dpath = self.diffusers[path]
            h = _native_height(layer, o)
            pairs = [(p.native_rows or (0, h), p.diffusers_rows or (0, o)) for p in layer.parts if p.diffusers == dpath]
            return Placed(name, layer, _put(m.up, h, pairs, name), m, layer.one_to_one)
        raise ToolError(f"{name}: not a layer of {self.family.label}")


def _put(up: torch.Tensor, height: int, pairs, name: str) -> torch.Tensor:
    """A ``height``-row copy of ``up``'s rows moved as ``pairs`` say: [(dest rows, source rows)]."""
    out = up.new_zeros((height, *up.shape[1:]))
    for (a, b), (c, d) in pairs:
        if b - a != d - c or b > height or d > up.shape[0]:
            raise ToolError(f"{name}: {up.shape[0]} output rows do not fit the layer's row layout")
        out[a:b] = up[c:d]
    return out


# --------------------------------------------------------------------------------- one module per layer

def _compact(up: torch.Tensor, m: LoraTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop rank columns whose up column is all zero (their ΔW term is zero) with their rows of down."""
    keep = up.reshape(up.shape[0], up.shape[1], -1).ne(0).any(dim=2).any(dim=0)
    if bool(keep.all()):
        return up, m.down
    return up[:, keep].contiguous(), m.down[keep].contiguous()


def combine(dest: str, pieces: list[tuple[torch.Tensor, LoraTensors, bool]]) -> LoraTensors | None:
    """One LoRA module for ``dest`` from [(placed up, source module, identity)]; None when all are zero.
    Several pieces are concatenated along the rank (block-diagonal up) and need one common α/r."""
    if len(pieces) == 1 and pieces[0][2]:  # the same layer: rows as they were (reordered at most)
        up, m, _ = pieces[0]
        return m if up is m.up else replace(m, up=up)
    parts = []
    for up, m, identity in pieces:
        if identity and m.mid is None and m.dora_scale is None:
            parts.append((up, m.down, m))
            continue
        if m.mid is not None or m.dora_scale is not None:
            raise ToolError(f"{dest}: a Tucker or DoRA module cannot be moved between fused and split layers exactly")
        u, d = _compact(up, m)
        if u.shape[1]:
            parts.append((u, d, m))
    if not parts:
        return None
    if len(parts) == 1:
        up, down, m = parts[0]
        if up is m.up:
            return m
        alpha = m.alpha if up.shape[1] == m.rank else float(m.alpha) / m.rank * up.shape[1]
        return LoraTensors(down, up, alpha)
    scales = {float(m.alpha) / m.rank for _, _, m in parts}
    if len(scales) > 1 or any(m.mid is not None or m.dora_scale is not None for _, _, m in parts):
        listed = ", ".join(f"{s:g}" for s in sorted(scales))
        raise ToolError(f"{dest}: its pieces have different scales α/r ({listed}) or Tucker/DoRA factors; one "
                        "module cannot hold them exactly (keep the split dialect)")
    up = torch.cat([u for u, _, _ in parts], dim=1)
    down = torch.cat([d for _, d, _ in parts], dim=0)
    return LoraTensors(down, up, scales.pop() * up.shape[1], stacked=True)


def to_native(layout: Layout, modules: dict[str, LoraTensors]) -> tuple[dict[str, LoraTensors], list[str]]:
    """{native path: module}, and a line per layer whose rank grew (split pieces stacked)."""
    groups: dict[str, list] = {}
    for name, m in modules.items():
        pl = layout.place(name, m)
        groups.setdefault(pl.layer.native, []).append((pl.up, m, pl.identity))
    out, notes = {}, []
    for native, pieces in groups.items():
        mod = combine(native, pieces)
        if mod is None:
            continue
        out[native] = mod
        if len(pieces) > 1:
            notes.append(f"{native}: {len(pieces)} modules stacked into one of rank {mod.rank}")
    return out, notes


def to_diffusers(layout: Layout, modules: dict[str, LoraTensors]) -> dict[str, LoraTensors]:
    """{diffusers path: module}: each native layer's rows handed to the diffusers layers holding them."""
    groups: dict[str, list] = {}
    for name, m in modules.items():
        pl = layout.place(name, m)
        h = pl.up.shape[0]
        for dpath in dict.fromkeys(p.diffusers for p in pl.layer.parts):
            parts = [p for p in pl.layer.parts if p.diffusers == dpath]
            hd = _diffusers_height(pl.layer, dpath, h)
            pairs = [(p.diffusers_rows or (0, hd), p.native_rows or (0, h)) for p in parts]
            same_rows = pl.identity and pl.layer.one_to_one
            up = pl.up if same_rows else _put(pl.up, hd, pairs, name)
            groups.setdefault(dpath, []).append((up, m, same_rows))
    out = {}
    for dpath, pieces in groups.items():
        mod = combine(dpath, pieces)
        if mod is not None:
            out[dpath] = mod
    return out


# ------------------------------------------------------------------------------------------ text encoders

def te_declaration(family: Family, name: str):
    """The family's text encoder a ``lora_te*_`` name addresses, and the name's rest."""
    for decl in family.text_encoders:
        for prefix in decl.kohya:
            for spelling in ({prefix, "lora_te1_"} if prefix == "lora_te_" else {prefix}):
                if name.startswith(spelling):
                    return decl, name[len(spelling):]
    raise ToolError(f"{name}: no text encoder of {family.label} has this prefix")


def te_module(family: Family, name: str, dotted: str | None) -> tuple[str, str, str]:
    """(kohya name, diffusers component, dotted path) of a text-encoder module."""
    from .convert import dotted_name

    decl, rest = te_declaration(family, name)
    if dotted is None:
        dotted = dotted_name("lora_te_" + rest)[1]
    return decl.kohya[0] + underscored(dotted), decl.diffusers, dotted


# ------------------------------------------------------------------------------------------------ writing

DIALECTS = ("kohya", "comfyui", "diffusers")
COMFY_PREFIX = "diffusion_model."


@dataclass
class Converted:
    tensors: dict  # kohya/ComfyUI: {module name: LoraTensors}; diffusers: {component: {dotted: LoraTensors}}
    modules: int
    notes: list


def convert_modules(family: Family, cfg: dict, modules: dict[str, LoraTensors], dotted: dict[str, str],
                    to: str) -> Converted:
    """The LoRA's modules in dialect ``to`` (``DIALECTS``)."""
    layout = Layout(family, cfg)
    unet = {n: m for n, m in modules.items() if n.startswith(UNET)}
    tes = {n: m for n, m in modules.items() if not n.startswith(UNET)}
    notes: list[str] = []
    if to == "diffusers":
        comps: dict[str, dict[str, LoraTensors]] = {"transformer": to_diffusers(layout, unet)} if unet else {}
        for name, m in tes.items():
            _, comp, path = te_module(family, name, dotted.get(name))
            comps.setdefault(comp, {})[path] = m
        return Converted(comps, sum(len(c) for c in comps.values()), notes)
    native, notes = to_native(layout, unet)
    named = {(UNET + underscored(p) if to == "kohya" else COMFY_PREFIX + p): m for p, m in native.items()}
    named |= {te_module(family, n, dotted.get(n))[0]: m for n, m in tes.items()}
    return Converted(named, len(named), notes)


def kohya_dialect(modules: dict[str, LoraTensors], metadata: dict) -> tuple[dict[str, LoraTensors], list[str]]:
    """The tools that write kohya files (merge, resize, extract) name Flux/Chroma/SD3 modules as sd-scripts
    does: native layers (``lora_unet_double_blocks_0_img_attn_qkv``, split pieces stacked when exact) and
    the family's text-encoder prefixes. Other LoRAs, and ones whose layout or scales do not allow it
    exactly, keep their names (one note says why)."""
    try:
        family = family_from_names(list(modules), metadata)
        if family is None:
            return modules, []
        conv = convert_modules(family, config_from_lora(family, modules), modules, {}, "kohya")
    except (ToolError, AmbiguousFamily) as e:
        return modules, [f"module names kept as they are ({e})"]
    return conv.tensors, conv.notes
