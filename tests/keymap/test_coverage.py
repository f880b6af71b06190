"""Every Linear/Conv2d/GroupNorm/LayerNorm of each family resolves, under every name a LoRA file
may give it, to the same physical weight in every host naming; the map is one-to-one; shapes match."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_engine.keymap import build_keymap
from tests.fixtures.models.hosts import a1111_root, comfy_state_dict, diffusers_root, nested_clip, shapes
from tests.fixtures.models.ldm_view import ldm_unet_view
from tests.fixtures.models.tiny_sd import ARCHS

LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
HOSTS = ("diffusers", "a1111", "a1111_wrapped", "comfy")


def host_state(model, host: str) -> dict[str, torch.Tensor]:
    if host == "diffusers":
        return diffusers_root(model).state_dict(keep_vars=True)
    if host == "comfy":
        return comfy_state_dict(model)
    return a1111_root(model, wrapped=host == "a1111_wrapped").state_dict(keep_vars=True)


def _us(path: str) -> str:
    return path.replace(".", "_")


def unet_cases(unet):
    """``(module, [(name, dotted)...])``: diffusers and ldm kohya names, and both dotted paths."""
    ldm_paths = {id(m): p for p, m in ldm_unet_view(unet).named_modules()}
    for path, module in unet.named_modules():
        if isinstance(module, LAYERS):
            ldm = ldm_paths[id(module)]
            yield module, [("lora_unet_" + _us(path), None), ("lora_unet_" + _us(ldm), None),
                           ("lora_unet_" + _us(path), path), ("lora_unet_" + _us(ldm), ldm)]


def te_cases(te, prefixes):
    for path, module in nested_clip(te).named_modules():
        if isinstance(module, LAYERS):
            names = [(p + _us(path), None) for p in prefixes] + [(p + _us(path), path) for p in prefixes]
            yield module, names


def _resolve(state, target, what):
    w = state[target.weight_key]
    b = state[target.bias_key] if target.bias_key else None
    if target.rows is not None:
        w = w[target.rows[0]:target.rows[1]]
        b = None if b is None else b[target.rows[0]:target.rows[1]]
    assert tuple(w.shape) == target.shape, what
    return w, b


def _cases(model, openclip_te2: bool):
    yield from unet_cases(model.unet)
    yield from te_cases(model.text_encoders[0], ("lora_te_", "lora_te1_"))
    if len(model.text_encoders) > 1:
        for module, names in te_cases(model.text_encoders[1], ("lora_te2_",)):
            if openclip_te2 and names[0][0].endswith("text_projection"):
                continue  # stored transposed in OpenCLIP; not mappable to a row slice (documented)
            yield module, names


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_maps_in_every_naming(tiny_models, arch, host):
    model = tiny_models[arch]
    state = host_state(model, host)
    km = build_keymap(shapes(state))
    assert km.architecture == arch
    assert km.ambiguous == []
    # OpenCLIP towers are built as fused copies of the HF encoders; everything else is shared.
    copied = tuple(p for p, n in zip(km.te_prefixes, km.te_namings) if n == "openclip")
    seen = {}
    for module, names in _cases(model, openclip_te2=host.startswith("a1111")):
        targets = {km.lookup(n, d) for n, d in names}
        assert None not in targets, f"{names[0][0]} unmapped on {host}"
        assert len(targets) == 1, f"{names} reach different weights on {host}"
        target = targets.pop()
        w, b = _resolve(state, target, names[0][0])
        assert torch.equal(w, module.weight), names[0][0]
        if not target.weight_key.startswith(copied):
            assert w is module.weight, names[0][0]  # the very same Parameter, not a copy
        assert (b is None) == (getattr(module, "bias", None) is None), names[0][0]
        if b is not None:
            assert torch.equal(b, module.bias)
        assert target.component == ("unet" if names[0][0].startswith("lora_unet_") else "te")
        key = (target.weight_key, target.rows)
        assert key not in seen, f"{names[0][0]} and {seen.get(key)} share {key}"
        seen[key] = names[0][0]


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_map_covers_every_weight_once(tiny_models, arch, host):
    """The map's targets are exactly the host's weights (fused in_proj: three row slices)."""
    state = host_state(tiny_models[arch], host)
    km = build_keymap(shapes(state))
    targets = km.targets()
    assert len({(t.weight_key, t.rows) for t in targets}) == len(targets)
    mapped = {t.weight_key for t in targets}
    weights = {k for k in state if k.endswith((".weight", "in_proj_weight", "positional_embedding"))}
    assert mapped == weights
    for t in targets:
        if t.rows is not None:
            assert t.weight_key.endswith("in_proj_weight") and t.bias_key.endswith("in_proj_bias")
            assert sum(u.rows[1] - u.rows[0] for u in targets if u.weight_key == t.weight_key) \
                == state[t.weight_key].shape[0]
