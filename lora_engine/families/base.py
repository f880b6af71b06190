"""The form of a model-family declaration: its two module trees, how their layers correspond, its
text encoders and its blocks.

A family names every LoRA-targetable layer twice: in the *native* tree (the original checkpoint's
names, which ComfyUI, Forge and kohya use) and in the *diffusers* tree. Most layers are one module
in both; some are one fused tensor in one tree and several in the other (Flux's ``qkv`` = ``to_q``,
``to_k``, ``to_v`` stacked on dim 0), and some store their rows in another order (the final adaLN:
native ``[shift; scale]``, diffusers ``[scale; shift]``). All of these are one shape of fact, a list
of :class:`Part` s: native rows ``[a, b)`` of the native layer are diffusers rows ``[c, d)`` of one
diffusers layer. Row counts come from the model's config (heads, kv heads, mlp width), never from
dividing a fused tensor's height.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import LoraEngineError

Rows = tuple[int, int]


class FamilyMismatch(LoraEngineError, ValueError):
    """The model's tensors do not fit the family's layout (a fused tensor of another height, ...)."""


@dataclass(frozen=True)
class Part:
    """Native rows ``native_rows`` (None: all) are rows ``diffusers_rows`` (None: all) of ``diffusers``."""

    native_rows: Rows | None
    diffusers: str
    diffusers_rows: Rows | None = None


@dataclass(frozen=True)
class Layer:
    """One targetable layer: its native module path, its diffusers parts, and the parameter name
    each tree gives its weight (norm scales are ``scale`` natively, ``weight`` in diffusers; ``""``:
    the path is itself a parameter, as Wan's ``blocks.N.modulation``, see :func:`param_key`)."""

    native: str
    parts: tuple[Part, ...]
    native_param: str = "weight"
    diffusers_param: str = "weight"

    @property
    def one_to_one(self) -> bool:
        return len(self.parts) == 1 and self.parts[0].native_rows is None and self.parts[0].diffusers_rows is None


def param_key(module: str, param: str) -> str:
    """The parameter key of a layer's weight: ``module.param``, or ``module`` when ``param`` is ``""``."""
    return f"{module}.{param}" if param else module


def same(native: str, diffusers: str, native_param: str = "weight", diffusers_param: str = "weight") -> Layer:
    """A layer that is one whole module in both trees."""
    return Layer(native, (Part(None, diffusers),), native_param, diffusers_param)


def stacked(native: str, pieces: list[tuple[str, int]], native_param: str = "weight") -> Layer:
    """A native layer whose rows stack whole diffusers layers in order: ``[(path, rows), ...]``."""
    parts, start = [], 0
    for path, n in pieces:
        parts.append(Part((start, start + n), path))
        start += n
    return Layer(native, tuple(parts), native_param)


def swap_scale_shift(native: str, diffusers: str, half: int) -> Layer:
    """An adaLN projection stored ``[shift; scale]`` natively and ``[scale; shift]`` in diffusers
    (``half`` rows each): native rows ``[0, half)`` are diffusers rows ``[half, 2·half)`` and back."""
    return Layer(native, (Part((0, half), diffusers, (half, 2 * half)), Part((half, 2 * half), diffusers, (0, half))))


@dataclass(frozen=True)
class Window:
    """A name some writers give to rows ``rows`` of a declared layer only (XLabs' single-block
    ``qkv_lora`` covers the q, k, v rows of ``linear1``, not its mlp rows): ``name`` is a native-style
    module path that exists in no tree."""

    name: str
    layer: Layer
    rows: Rows

    def parts(self) -> list[Part]:
        """The layer's parts inside the window, native rows counted from the window's start."""
        a, b = self.rows
        out = []
        for p in self.layer.parts:
            r = p.native_rows
            if r is not None and a <= r[0] and r[1] <= b:
                out.append(Part((r[0] - a, r[1] - a), p.diffusers, p.diffusers_rows))
        return out


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder of the family: what it is, and the kohya prefixes LoRA files use for it."""

    kind: str  # "clip_l" | "clip_h" | "clip_g" | "t5"
    kohya: tuple[str, ...]  # e.g. ("lora_te1_", "lora_te_") ; the first is the canonical one
    diffusers: str  # pipeline component, e.g. "text_encoder_2"


@dataclass(frozen=True)
class Family:
    """One model family: detection markers, config from tensor shapes, layers, encoders, blocks.

    ``markers``: ``{parameter key: naming}`` — a key only this family's tree (in that naming) has,
    relative to the model's root. ``config``: shapes (relative keys) + naming -> config dict.
    ``layer_list``: config -> every targetable :class:`Layer`. ``blocks``: config -> block ids in
    order (for block weights); ``block_re`` finds the block of a native or diffusers module path.
    ``requires``: ``{naming: key prefixes}`` that must also be present in that naming (tells a variant
    from its parent family, or a family from another sharing its marker); ``excludes``: key prefixes
    that rule the family out. ``te_by_position``: the model's CLIP encoders are the declared ones in
    order (SD: a tiny CLIP-G is not 1280 wide), else they are found by kind. ``widths``: the layer
    widths that tell a LoRA for this family (``context``: cross-attention input, ``te``/``te_mlp``:
    the first text encoder's width and MLP width), for ``inspect``. ``kohya_naming``: the tree whose names
    kohya's sd-scripts writes for the denoiser (SD1/SD2: ``diffusers``, SDXL: ``ldm``, i.e. sgm).
    """

    name: str
    label: str
    markers: Mapping[str, str]
    config: Callable[[Mapping[str, tuple], str], dict]
    layer_list: Callable[[dict], list[Layer]]
    text_encoders: tuple[TextEncoder, ...]
    blocks: Callable[[dict], list[str]]
    block_of: Callable[[str], str | None]
    requires: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    excludes: tuple[str, ...] = ()
    lora_patterns: tuple[re.Pattern, ...] = field(default=())  # names that say "a LoRA for this family"
    window_list: Callable[[dict, list[Layer]], list[Window]] | None = None
    te_by_position: bool = False
    widths: Mapping[str, int] = field(default_factory=dict)
    kohya_naming: str = "native"

    def fits(self, shapes: Mapping[str, tuple]) -> bool:
        """Whether a root's (relative) keys belong to this family."""
        if not any(m in shapes for m in self.markers):
            return False
        needed = self.requires.get(self.naming(shapes), ())
        return (all(any(k.startswith(r) for k in shapes) for r in needed)
                and not any(any(k.startswith(x) for k in shapes) for x in self.excludes))

    def naming(self, shapes: Mapping[str, tuple]) -> str:
        return next(n for m, n in self.markers.items() if m in shapes)

    def layers(self, config: dict) -> list[Layer]:
        return self.layer_list(config)

    def windows(self, config: dict, layers: list[Layer]) -> list[Window]:
        return [] if self.window_list is None else self.window_list(config, layers)


def count_blocks(shapes: Mapping[str, tuple], prefix: str) -> int:
    """How many ``prefix.N.`` blocks the keys hold (highest N + 1; 0 if none)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = [int(m.group(1)) for k in shapes if (m := pat.match(k))]
    return max(found) + 1 if found else 0


def rows_of(shapes: Mapping[str, tuple], *keys: str) -> int | None:
    """Dim 0 of the first of ``keys`` present, else None."""
    for k in keys:
        if k in shapes:
            return int(shapes[k][0])
    return None
