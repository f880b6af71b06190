"""UNet entries: every weighted module under both kohya namings and both dotted namings.

For a module at path ``P`` (the host's own naming) whose other-naming path is ``Q`` (the SD
declaration's layer, ``families.sd_unet``), the map accepts ``lora_unet_<P with _>``,
``lora_unet_<Q with _>`` and the dotted ``P`` and ``Q``. So kohya SD1/SD2 files (diffusers block
names), kohya SDXL files (sgm names), diffusers/PEFT files (dotted diffusers paths) and
ComfyUI-native files (dotted ldm paths) all land on the same weight, whichever host naming the
model uses. Entries come in the model's key order.
"""
from __future__ import annotations

from ..families import Family
from .roots import Root
from .target import Target, module_target, underscored, weighted_modules

PREFIX = "lora_unet_"


def other_paths(root: Root, family: Family) -> dict[str, str]:
    """Own module path -> the other tree's path, for every declared layer (one whole module in both)."""
    layers = family.layers(family.config(root.shapes, root.naming))
    if root.naming == "diffusers":
        return {layer.parts[0].diffusers: layer.native for layer in layers}
    return {layer.native: layer.parts[0].diffusers for layer in layers}


def unet_entries(root: Root, family: Family):
    """Yield ``(kohya names, dotted paths, Target)`` for each weighted module of the UNet root."""
    other = other_paths(root, family)
    for module in weighted_modules(root):
        target: Target = module_target(root, module, "unet")
        paths = [module]
        translated = other.get(module)
        if translated is not None:
            paths.append(translated)
        yield [PREFIX + underscored(p) for p in paths], paths, target
