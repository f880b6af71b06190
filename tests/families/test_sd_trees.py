"""SD1.5 and SDXL-base UNets, full size on the meta device (diffusers configs): the SD declaration
(``families.sd``) lists every targetable layer under its ldm/sgm and its diffusers name, the two are the
same module (the ldm view shares its leaves with the diffusers model, and is checked against diffusers'
converter in tests/keymap/test_full_size.py), the declaration is the same read from either tree, and
every layer maps both ways, one-to-one, through the key map in every host naming."""
from __future__ import annotations

import pytest
import torch

from lora_engine.families import BY_NAME
from lora_engine.families.sd import SD_ATTENTION_BLOCKS, SD_BLOCKS, SDXL_ATTENTION_BLOCKS, SDXL_BLOCKS
from lora_engine.keymap import build_keymap
from tests.fixtures.models.full_sd import UNET
from tests.fixtures.models.ldm_view import ldm_unet_view

BLOCKS = {"sd1": (SD_BLOCKS, SD_ATTENTION_BLOCKS), "sdxl": (SDXL_BLOCKS, SDXL_ATTENTION_BLOCKS)}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def trees(request):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET[request.param])
    ldm = ldm_unet_view(unet)
    return request.param, unet, ldm


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _weighted(module) -> dict:
    """Module path -> module, for every module owning a ``weight`` (the targetable layers)."""
    return {p: m for p, m in module.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}


def test_declaration_names_every_layer_once_in_both_trees(trees):
    arch, unet, ldm = trees
    family = BY_NAME[arch]
    layers = family.layers(family.config(_shapes(unet), "diffusers"))
    assert layers == family.layers(family.config(_shapes(ldm), "ldm"))  # one declaration, read from either tree
    assert all(layer.one_to_one for layer in layers)
    d_mods, l_mods = _weighted(unet), _weighted(ldm)
    present = [layer for layer in layers if layer.parts[0].diffusers in d_mods]
    assert len(present) == len(d_mods) == len(l_mods)  # every targetable layer is declared, once
    for layer in present:
        assert l_mods[layer.native] is d_mods[layer.parts[0].diffusers], layer.native
    # what the model lacks (SD1's mid-block shortcut, ...) is missing from both trees
    assert all(layer.native not in l_mods for layer in layers if layer not in present)


def _one_to_one(km, own: dict, other_names: list[str]) -> None:
    """The other tree's names reach each of the model's weights exactly once, whole."""
    hits = dict.fromkeys(own, 0)
    for name in other_names:
        t = km.lookup(name)
        assert t is not None and t.rows is None and t.shape == own[t.weight_key], name
        hits[t.weight_key] += 1
    assert [k for k, n in hits.items() if n != 1] == []


def _weights(shapes: dict) -> dict:
    return {k: s for k, s in shapes.items() if k.endswith(".weight")}


def _names(shapes: dict) -> list[str]:
    return ["lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in _weights(shapes)]


def test_every_layer_maps_both_ways(trees):
    arch, unet, ldm = trees
    dshapes, nshapes = _shapes(unet), _shapes(ldm)
    for own, other in ((dshapes, nshapes), (nshapes, dshapes)):
        for prefix in ("", "unet.", "diffusion_model.", "model.diffusion_model."):
            km = build_keymap({prefix + k: s for k, s in own.items()})
            assert km.architecture == arch and km.family is BY_NAME[arch] and km.ambiguous == []
            _one_to_one(km, {prefix + k: s for k, s in _weights(own).items()}, _names(other))
            for key in _weights(own):  # own names: the whole weight, by kohya name and by dotted path
                module = key[: -len(".weight")]
                t = km.lookup("lora_unet_" + module.replace(".", "_"), module)
                assert t is not None and t.weight_key == prefix + key and t.rows is None, key


def test_blocks_are_lbws(trees):
    """The declared block list is LBW's for the family, and a layer is in the same block by either name:
    attention layers exactly in the blocks a LoRA vector (17 / 12 entries) names."""
    arch, unet, ldm = trees
    family = BY_NAME[arch]
    cfg = family.config(_shapes(unet), "diffusers")
    every, attention = BLOCKS[arch]
    assert tuple(family.blocks(cfg)) == every
    d_mods = _weighted(unet)
    seen_attention = set()
    for layer in family.layers(cfg):
        d = layer.parts[0].diffusers
        if d not in d_mods:
            continue
        block = family.block_of(layer.native)
        assert block == family.block_of(d), d
        assert (block in every) if block else layer.native.startswith(("time_embed.", "label_emb.", "out.")), d
        if ".attentions." in d:
            seen_attention.add(block)
    assert seen_attention == set(attention)


def test_openclip_rows_come_from_its_width():
    """The fused q/k/v rows of an OpenCLIP tower are its width each (from ``ln_1``), not a third of
    whatever the tensor holds: a tower whose ``in_proj`` is not 3 widths high is refused, naming it."""
    from lora_engine.families import FamilyMismatch

    w, layer = 8, "cond_stage_model.model.transformer.resblocks.0."
    shapes = {layer + "ln_1.weight": (w,), layer + "attn.in_proj_weight": (3 * w, w), layer + "attn.in_proj_bias": (3 * w,)}
    km = build_keymap(shapes)
    rows = [km.lookup(f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj") for p in "qkv"]
    assert [(t.rows, t.shape, t.bias_key) for t in rows] == [
        ((i * w, (i + 1) * w), (w, w), layer + "attn.in_proj_bias") for i in range(3)]
    shapes[layer + "attn.in_proj_weight"] = (2 * w, w)
    with pytest.raises(FamilyMismatch, match=r"resblocks\.0\.attn\.in_proj_weight has 16 rows.*3 x 8"):
        build_keymap(shapes)
