"""UNet entries: every weighted module under both kohya namings and both dotted namings.

For a module at path ``P`` (the host's own naming) whose other-naming path is ``Q``
(``unet_blocks.UNetNaming``), the map accepts ``lora_unet_<P with _>``, ``lora_unet_<Q with _>``
and the dotted ``P`` and ``Q``. So kohya SD1/SD2 files (diffusers block names), kohya SDXL files
(sgm names), diffusers/PEFT files (dotted diffusers paths) and ComfyUI-native files (dotted
ldm paths) all land on the same weight, whichever host naming the model uses.
"""
from __future__ import annotations

from .roots import Root
from .target import Target, module_target, underscored, weighted_modules
from .unet_blocks import UNetNaming

PREFIX = "lora_unet_"


def unet_naming(root: Root) -> UNetNaming:
    return UNetNaming.from_paths(root.shapes, root.naming)


def unet_entries(root: Root):
    """Yield ``(kohya names, dotted paths, Target)`` for each weighted module of the UNet root."""
    naming = unet_naming(root)
    other = naming.to_ldm if root.naming == "diffusers" else naming.to_diffusers
    for module in weighted_modules(root):
        target: Target = module_target(root, module, "unet")
        paths = [module]
        translated = other(module)
        if translated is not None:
            paths.append(translated)
        yield [PREFIX + underscored(p) for p in paths], paths, target
