"""Key maps: canonical LoRA module names -> the host model's parameters, built once per model.

``build_keymap({param key: shape})`` finds the UNet and text encoders in any host naming
(diffusers pipeline parts, A1111 ldm/sgm, ComfyUI; see ``roots``) and lists every weighted
module under each name a LoRA file may use for it (``unet``, ``clip``, ``openclip``). Lookups
are single dict reads. The map is one-to-one: a name that would reach two weights is dropped
and listed in ``KeyMap.ambiguous`` (real models have none; the tests check it).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from .architecture import detect_architecture
from .clip import clip_entries
from .diagnose import diagnose_unmatched, foreign_family
from .openclip import openclip_entries
from .roots import Root, find_roots
from .target import Target
from .unet import unet_entries

__all__ = ["Target", "KeyMap", "build_keymap"]

log = logging.getLogger("lora_engine")

# Canonical prefix -> the slot it addresses. lora_te1_ is an alias of lora_te_.
SLOTS = ("lora_unet_", "lora_te_", "lora_te2_")
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
    """Resolve canonical names (and dotted paths) to :class:`Target` s of one model."""

    def __init__(self, names: dict[str, Target], dotted: dict[tuple[str, str], Target],
                 architecture: str, unet: Root | None, tes: list[Root], ambiguous: list[str]):
        self._names = names
        self._dotted = dotted
        self.architecture = architecture
        self.unet_naming = unet.naming if unet else None
        self.te_namings = tuple(r.naming for r in tes)
        self.te_prefixes = tuple(r.prefix for r in tes)
        self.ambiguous = ambiguous

    def lookup(self, name: str, dotted: str | None = None) -> Target | None:
        """Target for a canonical kohya name; the dotted path, when given, is tried first."""
        name = _normalise(name)
        if dotted is not None:
            hit = self._dotted.get((_slot(name), dotted))
            if hit is not None:
                return hit
        return self._names.get(name)

    def names(self) -> list[str]:
        """Every canonical name the map accepts (lora_te_ spelling for the first text encoder)."""
        return list(self._names)

    def targets(self) -> list[Target]:
        """Every distinct target, in build order."""
        return list(dict.fromkeys([*self._names.values(), *self._dotted.values()]))

    def diagnose(self, unmatched_names: list[str]) -> str:
        """One line saying why these names matched nothing (wrong family, wrong encoder, ...)."""
        return diagnose_unmatched(self, unmatched_names)

    def foreign_family(self, unmatched_names: list[str]) -> str | None:
        """The other model family these names were made for (``"SDXL"`` on an SD1.x model), or None."""
        return foreign_family(self, unmatched_names)

    def __len__(self) -> int:
        return len(self._names)


def _entries(unet: Root | None, tes: list[Root]):
    if unet is not None:
        for names, paths, target in unet_entries(unet):
            yield "lora_unet_", names, paths, target
    for te, prefix in zip(tes, ("lora_te_", "lora_te2_")):
        build = openclip_entries if te.naming == "openclip" else clip_entries
        for names, paths, target in build(te, prefix):
            yield prefix, names, paths, target
    if len(tes) > 2:
        log.warning("model has %d text encoders; only the first two are mapped (%s)",
                    len(tes), ", ".join(r.prefix for r in tes))


class _OneToOne(dict):
    """A dict that drops a key put twice with different values, remembering it in ``clashes``."""

    def __init__(self):
        super().__init__()
        self.clashes: set = set()

    def put(self, key, target: Target) -> None:
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
    names, dotted = _OneToOne(), _OneToOne()
    for slot, kohya, paths, target in _entries(unet, tes):
        for name in kohya:
            names.put(name, target)
        for path in paths:
            dotted.put((slot, path), target)
    ambiguous = sorted(names.clashes) + sorted(path for _, path in dotted.clashes)
    if ambiguous:
        log.warning("key map: %d names reach more than one weight and were dropped (e.g. %s)",
                    len(ambiguous), ambiguous[0])
    return KeyMap(dict(names), dict(dotted), detect_architecture(unet, tes), unet, tes, ambiguous)
