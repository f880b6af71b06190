"""Entries of a diffusion-transformer root, from its family's declaration.

Every declared layer the model has is listed under its native and its diffusers path (dotted and
kohya-underscored), whichever tree the model uses:

- the model's own layer: one whole-weight :class:`Target`;
- a name from the other tree that is a row block of one of the model's fused weights (``to_q`` on a
  native ``qkv``): a Target with ``rows`` (the block inside the fused weight);
- a name from the other tree that covers several of the model's weights or reorders rows (``qkv`` on a
  diffusers model, the final adaLN's ``[shift; scale]``): a tuple of Targets, each with ``delta_rows``,
  the rows of the LoRA's delta that land there.

Weighted modules the declaration does not list keep their own name.
"""
from __future__ import annotations

from ..families import Family
from ..families.base import Layer, Part, Window, param_key
from .roots import Root
from .target import Target, module_target, underscored, weighted_modules

PREFIX = "lora_unet_"


def _names(path: str) -> list[str]:
    return [PREFIX + underscored(path)]


def _region_shape(shape: tuple, rows) -> tuple:
    return tuple(shape) if rows is None else (rows[1] - rows[0], *shape[1:])


def _target(root: Root, module: str, param: str, rows, delta_rows) -> Target:
    wkey = param_key(module, param)
    bias = f"{module}.bias"
    return Target(root.full(wkey), root.full(bias) if bias in root.shapes else None, rows, "unet",
                  _region_shape(root.shapes[wkey], rows), delta_rows)


def _value(targets: list[Target]):
    """One Target when the name is one region taken whole, else the tuple."""
    if len(targets) == 1 and targets[0].delta_rows is None:
        return targets[0]
    return tuple(targets)


def _by_diffusers(layer: Layer) -> dict[str, list[Part]]:
    groups: dict[str, list[Part]] = {}
    for p in layer.parts:
        groups.setdefault(p.diffusers, []).append(p)
    return groups


def _native_model(root: Root, layer: Layer):
    if param_key(layer.native, layer.native_param) not in root.shapes:
        return
    yield _names(layer.native), [layer.native], _target(root, layer.native, layer.native_param, None, None)
    for dpath, parts in _by_diffusers(layer).items():
        targets = [_target(root, layer.native, layer.native_param, p.native_rows, p.diffusers_rows) for p in parts]
        yield _names(dpath), [dpath], _value(targets)


def _diffusers_model(root: Root, layer: Layer):
    if any(param_key(p.diffusers, layer.diffusers_param) not in root.shapes for p in layer.parts):
        return
    for dpath in _by_diffusers(layer):
        yield _names(dpath), [dpath], _target(root, dpath, layer.diffusers_param, None, None)
    targets = [_target(root, p.diffusers, layer.diffusers_param, p.diffusers_rows, p.native_rows) for p in layer.parts]
    yield _names(layer.native), [layer.native], _value(targets)


def _window(root: Root, w: Window, native_model: bool):
    """A window: on the native model the rows of the layer's weight; on the diffusers model the
    layers inside it, each taking its rows of the delta."""
    layer = w.layer
    if native_model:
        if f"{layer.native}.{layer.native_param}" in root.shapes:
            yield _names(w.name), [w.name], _target(root, layer.native, layer.native_param, w.rows, None)
        return
    parts = w.parts()
    if parts and all(f"{p.diffusers}.{layer.diffusers_param}" in root.shapes for p in parts):
        targets = [_target(root, p.diffusers, layer.diffusers_param, p.diffusers_rows, p.native_rows) for p in parts]
        yield _names(w.name), [w.name], _value(targets)


def dit_entries(root: Root, family: Family):
    """Yield ``(kohya names, dotted paths, Target or tuple of Targets)`` for the root's layers."""
    cfg = family.config(root.shapes, root.naming)
    build = _native_model if root.naming == "native" else _diffusers_model
    own = set()
    layers = family.layers(cfg)
    for layer in layers:
        for names, paths, value in build(root, layer):
            own.update(t.weight_key for t in (value if isinstance(value, tuple) else (value,)))
            yield names, paths, value
    for w in family.windows(cfg, layers):
        yield from _window(root, w, root.naming == "native")
    for module in weighted_modules(root):
        if root.full(module + ".weight") not in own:
            yield _names(module), [module], module_target(root, module, "unet")


def hf_entries(root: Root, prefixes: tuple[str, ...], component: str = "te"):
    """Text encoders whose LoRA names are kohya's rule on the HF path (T5; CLIP has its own module)."""
    for module in weighted_modules(root):
        target = module_target(root, module, component)
        for prefix in prefixes:
            yield prefix, [prefix + underscored(module)], [module], target
