"""Block weights in the syntax of sd-webui-lora-block-weight (LBW): vectors, presets,
``R``/``U``/``X`` values, elemental (``lbwe``) directives, and the per-module multiplier.

A module's multiplier is ``m = (te if text-encoder module else unet) * ratio`` where
``ratio`` is the LBW block ratio of the module's block (BASE for every text-encoder
module), replaced by the ratio of the last matching elemental directive if any.

Block ids, in 26-slot order: BASE, IN00..IN11, M00, OUT00..OUT11. Shorter vectors name
their slots (17: SD1/2 LoRA, 12: SDXL LoRA, 20: SDXL full); slots a vector does not
name get 0, as in LBW's ``to26``. UNet modules outside every block (time embedding,
``conv_out``, ``label_emb``...) keep ratio 1.

Module names are canonical kohya names (``lora_unet_input_blocks_4_1_...``,
``lora_unet_down_blocks_1_attentions_0_...``, ``lora_te1_...``). diffusers-style UNet
names are first rewritten to the ldm/compvis layout LBW matches on (``families.sd``:
``down_blocks.i.{resnets,attentions}.j`` -> ``input_blocks.{3i+j+1}.{0,1}``, ``up_blocks.i.*.j``
-> ``output_blocks.{3i+j}``, ``mid_block`` -> ``middle_block``). Facts from hako-mikan/sd-webui-lora-block-weight
(b403cb7, ``scripts/lora_block_weight.py``); tables, presets and directives in docs/tag-grammar.md.

Flux (LBW's ``BLOCKIDFLUX``): 61 entries, CLIP, T5, IN, D00..D18 (double blocks), S00..S37 (single blocks),
OUT — whatever the model's depth. A module's Flux block: its text encoder's kind (CLIP-L: CLIP, T5-XXL: T5,
from the family's ``text_encoders``), its double/single block (the family's ``block_of``, either tree), IN for
the input embedders and OUT for the final layer (the family's top-level layers, classified on their native
name as LBW does: ``final_layer`` is OUT, the rest IN); any other module keeps ratio 1. A 61-entry vector
weighs only Flux blocks and a 12–26-entry vector only SD blocks (the other modules keep 1). LBW has no
SD3 layout.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..families.sd import (SD_ATTENTION_BLOCKS, SD_BLOCKS, SDXL_ATTENTION_BLOCKS, SDXL_BLOCKS, lbw_block,
                           ldm_unet_path)

# the families' block lists (``families.sd``): all blocks, or those a LoRA (attention) vector names
BLOCK_IDS_26 = ("BASE",) + SD_BLOCKS
BLOCK_IDS_17 = ("BASE",) + SD_ATTENTION_BLOCKS
BLOCK_IDS_12 = ("BASE",) + SDXL_ATTENTION_BLOCKS
BLOCK_IDS_20 = ("BASE",) + SDXL_BLOCKS
BLOCK_IDS_FLUX = ("CLIP", "T5", "IN") + tuple(f"D{i:02d}" for i in range(19)) + tuple(f"S{i:02d}" for i in range(38)) \
    + ("OUT",)
BLOCK_TABLES: dict[int, tuple[str, ...]] = {12: BLOCK_IDS_12, 17: BLOCK_IDS_17, 20: BLOCK_IDS_20, 26: BLOCK_IDS_26,
                                            61: BLOCK_IDS_FLUX}

DEFAULT_PRESETS_TEXT = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
FLUXALL:""" + ",".join(["1"] * 61) + "\n"

DEFAULT_ELEMENT_PRESETS_TEXT = """\
ATTNDEEPON:IN05-OUT05:attn:1

ATTNDEEPOFF:IN05-OUT05:attn:0

PROJDEEPOFF:IN05-OUT05:proj:0

XYZ:::1
"""

_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_X_RE = re.compile(r"X(?:([+-])(\d+\.?\d*|\.\d+))?\Z")


def parse_number(text: str) -> float | None:
    """A finite decimal number as people write it (``-0.5``, ``.5``, ``1e-1``), else None."""
    t = text.strip()
    if not _NUMBER_RE.match(t):
        return None
    v = float(t)
    return v if abs(v) != float("inf") else None


@dataclass(frozen=True)
class BlockValue:
    """One vector entry: a number, ``R`` (random in [0, 1], 3 decimals), ``U`` (random in
    [-0.5, 1.5], 3 decimals) or ``X``/``X+d``/``X-d`` (the tag's ``x=`` value, default 1, plus d)."""

    kind: str  # "num" | "R" | "U" | "X"
    value: float = 0.0  # the number, or X's offset

    def resolve(self, x: float, rng: random.Random) -> float:
        if self.kind == "R":
            return round(rng.random(), 3)
        if self.kind == "U":
            return round(rng.uniform(-0.5, 1.5), 3)
        if self.kind == "X":
            return x + self.value
        return self.value

    def text(self) -> str:
        if self.kind == "num":
            return repr(self.value)
        if self.kind == "X" and self.value:
            return f"X{self.value:+}"
        return self.kind


@dataclass(frozen=True)
class BlockSpec:
    """A block-weight vector expanded to the 26 slots of ``BLOCK_IDS_26`` (SD), or the 61 of
    ``BLOCK_IDS_FLUX``.

    ``length`` is the vector length as written (12, 17, 20, 26 or 61); ``source`` the preset
    name or the literal vector text."""

    values: tuple[BlockValue, ...]
    length: int
    source: str

    @property
    def ids(self) -> tuple[str, ...]:
        """The block id of each value."""
        return BLOCK_IDS_FLUX if len(self.values) == len(BLOCK_IDS_FLUX) else BLOCK_IDS_26

    def resolve(self, x: float = 1.0, rng: random.Random | None = None) -> tuple[float, ...]:
        """The 26 ratios, with ``R``/``U`` drawn from ``rng`` and ``X`` replaced by ``x``."""
        rng = rng or random.Random()
        return tuple(v.resolve(x, rng) for v in self.values)

    def is_random(self) -> bool:
        return any(v.kind in ("R", "U") for v in self.values)


def _parse_value(token: str) -> BlockValue:
    t = token.strip()
    if t in ("R", "U"):
        return BlockValue(t)
    m = _X_RE.match(t)
    if m:
        off = float(m.group(2)) if m.group(2) else 0.0
        return BlockValue("X", -off if m.group(1) == "-" else off)
    v = parse_number(t)
    if v is None:
        raise ValueError(f"block weight {t!r} is not a number, R, U, X, X+d or X-d")
    return BlockValue("num", v)


def parse_vector(text: str, source: str | None = None) -> BlockSpec:
    """Parse ``"1,0,0.5,..."`` (12/17/20/26 entries) into a 26-slot :class:`BlockSpec`, or a 61-entry
    Flux vector into its 61 slots.

    Raises ValueError with a one-line reason."""
    tokens = [t for t in text.split(",")]
    n = len(tokens)
    if n not in BLOCK_TABLES:
        raise ValueError(f"block vector has {n} values; expected 12, 17, 20, 26 or 61 (Flux)")
    vals = [_parse_value(t) for t in tokens]
    if n == len(BLOCK_IDS_FLUX):
        return BlockSpec(tuple(vals), n, source if source is not None else text)
    slots = {bid: BlockValue("num", 0.0) for bid in BLOCK_IDS_26}
    for bid, v in zip(BLOCK_TABLES[n], vals):
        slots[bid] = v
    return BlockSpec(tuple(slots[b] for b in BLOCK_IDS_26), n, source if source is not None else text)


def parse_presets(text: str) -> dict[str, str]:
    """``ID:v1,...,vn`` lines -> {ID: vector text}. As in LBW, a line with ``#``, without
    ``:``, or whose value count is not 12/17/20/26/61 is a comment."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "#" in line or ":" not in line:
            continue
        key, vec = line.split(":", 1)
        if len(vec.split(",")) in BLOCK_TABLES:
            out[key.strip()] = vec.strip()
    return out


DEFAULT_PRESETS = parse_presets(DEFAULT_PRESETS_TEXT)


def resolve_lbw(value: str, presets: dict[str, str] | None = None) -> BlockSpec:
    """``lbw=`` argument: a preset name or a literal vector. Raises ValueError."""
    presets = DEFAULT_PRESETS if presets is None else presets
    v = value.strip()
    if v in presets:
        return parse_vector(presets[v], source=v)
    if "," not in v:
        raise ValueError(f"unknown block-weight preset {v!r}")
    return parse_vector(v)


# ---- elemental directives (lbwe=) ----

@dataclass(frozen=True)
class ElementDirective:
    """``blocks:elements:ratio``. ``blocks`` are block ids (ranges expanded), ``elements``
    substrings of the module's ldm-style name; empty means all; ``NOT`` inverts."""

    blocks: tuple[str, ...]
    blocks_not: bool
    elements: tuple[str, ...]
    elements_not: bool
    ratio: float

    def matches(self, block: str, key: str) -> bool:
        hit_b = (block not in self.blocks) if self.blocks_not else (not self.blocks or block in self.blocks)
        if not hit_b:
            return False
        any_e = any(e in key for e in self.elements) if self.elements else not self.elements_not
        return (not any_e) if self.elements_not else any_e


def _expand_blocks(field: str) -> tuple[bool, tuple[str, ...]]:
    """Block ids and ranges of SD (``IN05-OUT05``) or Flux (``D00-D05``, ``S10-OUT``) ids."""
    toks = [t for t in field.strip().split(" ") if t]
    neg = bool(toks) and toks[0] == "NOT"
    out: list[str] = []
    for t in toks[1:] if neg else toks:
        if "-" in t:
            a, _, b = t.partition("-")
            table = next((ids for ids in (BLOCK_IDS_26, BLOCK_IDS_FLUX) if a in ids and b in ids), None)
            if table is None:
                raise ValueError(f"unknown block range {t!r}")
            i, j = sorted((table.index(a), table.index(b)))
            out.extend(table[i : j + 1])
        elif t in BLOCK_IDS_26 or t in BLOCK_IDS_FLUX:
            out.append(t)
        else:
            raise ValueError(f"unknown block id {t!r}")
    return neg, tuple(out)


def parse_directives(text: str) -> tuple[ElementDirective, ...]:
    """Directives separated by ``,`` or newlines; entries without exactly two ``:`` are skipped (LBW)."""
    out = []
    for d in text.replace("\n", ",").split(","):
        if d.count(":") != 2:
            continue
        bf, ef, rf = d.split(":")
        ratio = parse_number(rf)
        if ratio is None:
            raise ValueError(f"elemental ratio {rf!r} is not a number")
        bneg, blocks = _expand_blocks(bf)
        etoks = [t for t in ef.strip().split(" ") if t]
        eneg = bool(etoks) and etoks[0] == "NOT"
        out.append(ElementDirective(blocks, bneg, tuple(etoks[1:] if eneg else etoks), eneg, ratio))
    return tuple(out)


def parse_element_presets(text: str) -> dict[str, str]:
    """Entries separated by blank lines: ``ID:blocks:elements:ratio[, more directives]``."""
    out: dict[str, str] = {}
    for entry in re.split(r"\n\s*\n", text):
        if ":" in entry:
            key, rest = entry.split(":", 1)
            out[key.strip()] = rest.strip()
    return out


DEFAULT_ELEMENT_PRESETS = parse_element_presets(DEFAULT_ELEMENT_PRESETS_TEXT)


# ---- module name -> block ----

def module_block(name: str) -> tuple[str | None, str]:
    """``(block id or None, ldm-style key)`` for a canonical module name.

    Text-encoder modules (``lora_te*``) are BASE. ``None`` means the module is in no
    block (LBW gives it ratio 1)."""
    n = name.replace(".", "_")
    if n.startswith("lora_te"):
        return "BASE", n
    path = n[len("lora_unet_"):] if n.startswith("lora_unet_") else n
    ldm = ldm_unet_path(path)
    return lbw_block(ldm), "diffusion_model_" + ldm


def _flux_tables() -> tuple[dict[str, str], tuple[str, ...]]:
    """(kohya text-encoder prefix -> CLIP/T5, top-level layer paths with ``_`` -> IN/OUT) from the Flux and
    Chroma declarations (their top layers do not depend on the config's widths)."""
    from ..families import BY_NAME

    te: dict[str, str] = {}
    top: dict[str, str] = {}
    cfg = {"heads": 1, "head_dim": 1, "kv_heads": 1, "inner": 1, "mlp": 1, "double": 0, "single": 0, "approximator": 1}
    for fam in (BY_NAME["flux"], BY_NAME["chroma"]):
        for enc in fam.text_encoders:
            for prefix in enc.kohya:
                te.setdefault(prefix, "CLIP" if enc.kind.startswith("clip") else "T5")
        for layer in fam.layers(cfg):
            block = "OUT" if layer.native.startswith("final_layer") else "IN"
            for path in (layer.native, *(p.diffusers for p in layer.parts)):
                top[path.replace(".", "_")] = block
    return te, tuple(sorted(top.items(), key=lambda kv: -len(kv[0])))


_FLUX_TABLES: tuple | None = None
_FLUX_BLOCK_RE = re.compile(r"(double|single)_blocks\.(\d+)\Z")


def flux_block(name: str) -> str | None:
    """The LBW Flux block id (``CLIP``, ``T5``, ``IN``, ``D00``…, ``S00``…, ``OUT``) of a canonical module
    name, or None (a module in no Flux block)."""
    global _FLUX_TABLES
    if _FLUX_TABLES is None:
        _FLUX_TABLES = _flux_tables()
    te, top = _FLUX_TABLES
    from ..families import BY_NAME

    n = name.replace(".", "_")
    for prefix, kind in te.items():
        if n.startswith(prefix):
            return kind
    path = n[len("lora_unet_"):] if n.startswith("lora_unet_") else n
    m = _FLUX_BLOCK_RE.match(BY_NAME["flux"].block_of(path) or "")
    if m:
        return f"{m[1][0].upper()}{int(m[2]):02d}"
    for p, block in top:
        if path == p or path.startswith(p + "_"):
            return block
    return None


@dataclass(frozen=True)
class BlockRatios:
    """Callable ``module name -> block ratio`` of one tag: the block vector's entry for the module's
    block (1 outside every block, or with no vector), then the last elemental directive that matches.

    A module's multiplier is ``(te if text-encoder module else unet) * ratio``; the te/unet part is the
    stack entry's strength, applied by the plan (``StackEntry.te``/``.unet``), never here."""

    ratios: tuple[float, ...] | None = None  # the 26 (SD) or 61 (Flux) resolved block ratios (None = all 1)
    directives: tuple[ElementDirective, ...] = ()

    def __call__(self, name: str) -> float:
        flux = self.ratios is not None and len(self.ratios) == len(BLOCK_IDS_FLUX)
        if flux or (self.ratios is None and any(any(b in BLOCK_IDS_FLUX for b in d.blocks) for d in self.directives)):
            block, key = flux_block(name), name.replace(".", "_")
            table = BLOCK_IDS_FLUX
        else:
            (block, key), table = module_block(name), BLOCK_IDS_26
        r = 1.0
        if block is not None and self.ratios is not None and len(self.ratios) == len(table):
            r = self.ratios[table.index(block)]
        for d in self.directives:
            if d.matches(block or "", key):
                r = d.ratio
        return r


def block_ratios(tag, rng: random.Random | None = None) -> BlockRatios | None:
    """The block ratios of a parsed tag (:class:`lora_engine.syntax.prompt.LoraTag`), None when it has
    neither ``lbw=`` nor ``lbwe=``. ``R``/``U`` entries are drawn once here, from ``rng``, so one
    generation sees one draw."""
    if tag.lbw is None and not tag.elements:
        return None
    ratios = None
    if tag.lbw is not None:
        ratios = tag.lbw.resolve(1.0 if tag.x is None else tag.x, rng)
    return BlockRatios(ratios, tuple(tag.elements))


def lbw_ratios(text: str | None) -> BlockRatios | None:
    """Block ratios from a bare block-weight string (a vector ``"1,0,0,…"`` or a preset name, as a
    node's text input gives it); None when empty. :class:`ValueError` with the reason when malformed."""
    if not text or not text.strip():
        return None
    return BlockRatios(resolve_lbw(text.strip()).resolve(1.0))
