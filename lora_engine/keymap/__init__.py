"""Key maps: canonical LoRA module names -> the host model's parameters, built once per model.

``build_keymap({param key: shape})`` finds the UNet and text encoders in any host naming
(diffusers pipeline parts, A1111 ldm/sgm, ComfyUI; see ``roots``) and lists every weighted
module under each name a LoRA file may use for it (``unet``, ``dit``, ``clip``), from the model
family's declaration (``lora_engine.families``: SD1/SD2/SDXL, Flux.1, Chroma, SD3). Lookups
are single dict reads. The map is one-to-one: a name that would reach two weights is dropped
and listed in ``KeyMap.ambiguous`` (real models have none; the tests check it).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from ..families import BY_NAME, Family, sd_family
from ..families.sd import SD1
from .clip import clip_entries, openclip_entries
from .diagnose import diagnose_unmatched, foreign_family
from .dit import dit_entries, hf_entries
from .roots import Root, find_roots
from .target import Target
from .unet import unet_entries

SD_UNET = SD1  # SD1, SD2 and SDXL declare one UNet tree

__all__ = ["Target", "KeyMap", "build_keymap"]

log = logging.getLogger("lora_engine")

# Canonical prefix -> the slot it addresses. lora_te1_ is an alias of lora_te_.
SLOTS = ("lora_unet_", "lora_te_", "lora_te2_", "lora_te3_")
_ALIASES = {"lora_te1_": "lora_te_"}


def _normalise(name: str) -> str:
    for alias, canon in _ALIASES.items():
        if name.startswith(alias):
            return canon + name[len(alias):]
    return name


def _slot(name: str) -> str | None:
    for s in SLOTS:
        if name.startswith(s):
            return s
    return None


class KeyMap:
    """Resolve canonical names (and dotted paths) to :class:`Target` s of one model.

    A name may reach several targets (a fused LoRA module on a model whose layers are separate, or
    rows stored in another order); ``resolve`` gives all of them, ``lookup`` only single targets.
    """

    def __init__(self, names: dict, dotted: dict, architecture: str, unet: Root | None, tes: list[Root],
                 ambiguous: list[str], family: Family | None = None):
        self._names = names
        self._dotted = dotted
        self.architecture = architecture
        self.family = family
        self.unet_naming = unet.naming if unet else None
        self.te_namings = tuple(r.naming for r in tes)
        self.te_prefixes = tuple(r.prefix for r in tes)
        self.ambiguous = ambiguous

    def _value(self, name: str, dotted: str | None):
        name = _normalise(name)
        if dotted is not None:
            hit = self._dotted.get((_slot(name), dotted))
            if hit is not None:
                return hit
        return self._names.get(name)

    def lookup(self, name: str, dotted: str | None = None) -> Target | None:
        """Target for a canonical kohya name; the dotted path, when given, is tried first. None when
        the name reaches nothing or several targets (see ``resolve``)."""
        hit = self._value(name, dotted)
        return hit if isinstance(hit, Target) else None

    def resolve(self, name: str, dotted: str | None = None) -> tuple[Target, ...]:
        """Every target the name reaches (empty when none)."""
        hit = self._value(name, dotted)
        if hit is None:
            return ()
        return hit if isinstance(hit, tuple) else (hit,)

    def names(self) -> list[str]:
        """Every canonical name that reaches one target (lora_te_ spelling for the first text encoder)."""
        return [n for n, v in self._names.items() if isinstance(v, Target)]

    def targets(self) -> list[Target]:
        """Every distinct single target, in build order."""
        return list(dict.fromkeys(v for v in [*self._names.values(), *self._dotted.values()] if isinstance(v, Target)))

    def block_of(self, name: str) -> str | None:
        """The family's block of a canonical ``lora_unet_`` name (``double_blocks.3``), or None."""
        if self.family is None or not name.startswith("lora_unet_"):
            return None
        return self.family.block_of(name[len("lora_unet_"):])

    def diagnose(self, unmatched_names: list[str]) -> str:
        """One line saying why these names matched nothing (wrong family, wrong encoder, ...)."""
        return diagnose_unmatched(self, unmatched_names)

    def foreign_family(self, unmatched_names: list[str]) -> str | None:
        """The other model family these names were made for (``"SDXL"`` on an SD1.x model), or None."""
        return foreign_family(self, unmatched_names)

    def __len__(self) -> int:
        return len(self._names)


def _te_kind(root: Root) -> str:
    """``t5``, ``clip_g`` or ``clip_l``: by ComfyUI's attribute name (``clip_g.transformer.``) where the
    host names it, else by width (CLIP-G is 1280 wide)."""
    if root.naming == "t5":
        return "t5"
    for kind in ("clip_g", "clip_l"):
        if root.prefix.startswith(kind + "."):
            return kind
    for key in ("text_model.final_layer_norm.weight", "final_layer_norm.weight", "ln_final.weight"):
        if key in root.shapes:
            return "clip_g" if root.shapes[key][0] == 1280 else "clip_l"
    return "clip_l"


def _te_roots(family: Family, tes: list[Root]):
    """``(declared encoder, its root)`` pairs: by position (SD) or by kind."""
    if family.te_by_position:
        clip = [r for r in tes if r.naming != "t5"]
        if len(clip) > len(family.text_encoders):
            log.warning("model has %d text encoders; only the first %d are mapped (%s)", len(clip),
                        len(family.text_encoders), ", ".join(r.prefix for r in clip))
        return list(zip(family.text_encoders, clip))
    pairs = [(decl, next((r for r in tes if _te_kind(r) == decl.kind), None)) for decl in family.text_encoders]
    return [(decl, root) for decl, root in pairs if root is not None]


def _family_te_entries(family: Family, tes: list[Root]):
    """Text encoders, under every kohya prefix the family's writers use for them."""
    for decl, root in _te_roots(family, tes):
        prefixes = tuple(dict.fromkeys(_normalise(p) for p in decl.kohya))
        if decl.kind == "t5":
            yield from hf_entries(root, prefixes)
            continue
        build = openclip_entries if root.naming == "openclip" else clip_entries
        for prefix in prefixes:
            for names, paths, target in build(root, prefix):
                yield prefix, names, paths, target


def _entries(unet: Root | None, tes: list[Root], family: Family | None):
    if unet is not None:
        # an SD UNet of a model whose family is not told still has the one SD UNet tree
        build = dit_entries if unet.family else unet_entries
        for names, paths, value in build(unet, family or SD_UNET):
            yield "lora_unet_", names, paths, value
    if family is not None:
        yield from _family_te_entries(family, tes)


class _OneToOne(dict):
    """A dict that drops a key put twice with different values, remembering it in ``clashes``."""

    def __init__(self):
        super().__init__()
        self.clashes: set = set()

    def put(self, key, target) -> None:
        if key in self.clashes:
            return
        if self.get(key, target) != target:
            self.clashes.add(key)
            del self[key]
            return
        self[key] = target


def build_keymap(named_shapes: Mapping[str, tuple[int, ...]]) -> KeyMap:
    """Build the map from ``{parameter key: shape}`` of a root (a ``state_dict`` view)."""
    unet, tes = find_roots(named_shapes)
    if unet is not None and unet.family:
        family = BY_NAME[unet.family]
    else:
        family = sd_family(None if unet is None else unet.shapes, [r for r in tes if r.naming != "t5"])
    names, dotted = _OneToOne(), _OneToOne()
    for slot, kohya, paths, target in _entries(unet, tes, family):
        for name in kohya:
            names.put(name, target)
        for path in paths:
            dotted.put((slot, path), target)
    ambiguous = sorted(names.clashes) + sorted(path for _, path in dotted.clashes)
    if ambiguous:
        log.warning("key map: %d names reach more than one weight and were dropped (e.g. %s)",
                    len(ambiguous), ambiguous[0])
    arch = family.name if family is not None else "unknown"
    return KeyMap(dict(names), dict(dotted), arch, unet, tes, ambiguous, family)
