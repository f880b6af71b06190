"""Flux.1-dev, Chroma, SD3.5-Large, SD3.5-Medium, Qwen-Image, Wan 2.1-I2V-14B, Wan 2.2-TI2V-5B, Z-Image-Turbo, Lumina-Image-2.0, full size on the meta device: the declaration's native tree is
the one diffusers' single-file converter reads (Qwen-Image: the diffusers names themselves, as ComfyUI's model has them) (names, shapes and the order of every row block), and every targetable
layer maps both ways, one-to-one, whichever tree the model uses."""
from __future__ import annotations

import pytest
import torch

from lora_engine.keymap import build_keymap
from tests.fixtures.models.dit import (LUMINA2_FULL, QWEN_IMAGE, WAN21_I2V_14B, WAN22_TI2V_5B, Z_IMAGE_TURBO, lumina2_model, qwen_model,
                                      wan_model, z_image_model)
from tests.fixtures.models.flux import CHROMA, FLUX_DEV, SD35_LARGE, SD35_MEDIUM, flux_model, native_state, sd3_model

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

CASES = {"flux": ("flux", lambda: flux_model(FLUX_DEV, meta=True), "convert_flux_transformer_checkpoint_to_diffusers"),
         "chroma": ("chroma", lambda: flux_model(CHROMA, meta=True, chroma=True),
                    "convert_chroma_transformer_checkpoint_to_diffusers"),
         "sd3.5-large": ("sd3", lambda: sd3_model(SD35_LARGE, meta=True), "convert_sd3_transformer_checkpoint_to_diffusers"),
         "sd3.5-medium": ("sd3", lambda: sd3_model(SD35_MEDIUM, meta=True), "convert_sd3_transformer_checkpoint_to_diffusers"),
         "qwen-image": ("qwen_image", lambda: qwen_model(QWEN_IMAGE, meta=True), dict),
         "wan2.1-i2v-14b": ("wan", lambda: wan_model(WAN21_I2V_14B, meta=True), "convert_wan_transformer_to_diffusers"),
         "wan2.2-ti2v-5b": ("wan", lambda: wan_model(WAN22_TI2V_5B, meta=True), "convert_wan_transformer_to_diffusers"),
         "z-image-turbo": ("z_image", lambda: z_image_model(Z_IMAGE_TURBO, meta=True),
                           "convert_z_image_transformer_checkpoint_to_diffusers"),
         "lumina2": ("lumina2", lambda: lumina2_model(LUMINA2_FULL, meta=True), "convert_lumina2_to_diffusers")}
# tensors outside every LoRA-targetable layer, native -> diffusers name (the converter needs them)
EXTRAS = {"pos_embed": "pos_embed.pos_embed", "x_pad_token": "x_pad_token", "cap_pad_token": "cap_pad_token"}


@pytest.fixture(scope="module", params=list(CASES))
def trees(request):
    family, build, converter = CASES[request.param]
    model = build()
    dshapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    nshapes = {k: tuple(v.shape) for k, v in native_state(model, family).items()}
    nshapes.update({n: dshapes[d] for n, d in EXTRAS.items() if d in dshapes})
    return family, dshapes, nshapes, getattr(single_file, converter) if isinstance(converter, str) else converter


def _labelled(shapes: dict) -> dict:
    """One column per tensor, each row holding a distinct number: the converter only moves rows."""
    out, start = {}, 0
    for k, s in shapes.items():
        out[k] = torch.arange(start, start + s[0], dtype=torch.float64).reshape(s[0], *([1] * (len(s) > 1)))
        start += s[0]
    return out


def test_native_tree_is_the_converters(trees):
    family, dshapes, nshapes, convert = trees
    converted = convert(_labelled(nshapes))
    assert set(converted) == set(dshapes)
    assert all(converted[k].shape[0] == dshapes[k][0] for k in dshapes)


def _pieces(km, name: str, rows_of_key) -> torch.Tensor:
    """The LoRA delta rows of module ``name`` rebuilt from the model's rows the map sends them to."""
    targets = km.resolve(name)
    assert targets, name
    order = sorted(targets, key=lambda t: (t.delta_rows or (0, 0))[0])
    parts = []
    for t in order:
        rows = rows_of_key(t.weight_key)
        parts.append(rows if t.rows is None else rows[t.rows[0]:t.rows[1]])
    return torch.cat(parts)


def test_rows_land_where_the_converter_puts_them(trees):
    """Every diffusers layer, looked up on the native model, collects exactly the native rows the
    converter turns into it (q/k/v/mlp blocks, the swapped final adaLN): row labels compared."""
    family, dshapes, nshapes, convert = trees
    labels = _labelled(nshapes)
    converted = convert(dict(labels))
    km = build_keymap(nshapes)
    assert km.architecture == family and km.ambiguous == []
    for key in _weights(dshapes):
        module, _, param = key.rpartition(".")
        got = _pieces(km, "lora_unet_" + module.replace(".", "_"), lambda k: labels[k])
        assert torch.equal(got.flatten(), converted[key].flatten()), key


def _one_to_one(km, own: dict, other_names: list[str]) -> None:
    """The other tree's names cover each of the model's weights exactly once, row for row."""
    covered = {k: torch.zeros(s[0], dtype=torch.int32) for k, s in own.items()}
    for name in other_names:
        targets = km.resolve(name)
        assert targets, name
        for t in targets:
            assert t.shape[1:] == own[t.weight_key][1:], name
            r = t.rows or (0, own[t.weight_key][0])
            covered[t.weight_key][r[0]:r[1]] += 1
    bad = [k for k, c in covered.items() if not bool((c == 1).all())]
    assert bad == [], bad[:3]


def _weights(shapes: dict) -> dict:
    return {k: s for k, s in shapes.items() if k.endswith((".weight", ".scale"))}


def _names(shapes: dict) -> list[str]:
    return ["lora_unet_" + k.rpartition(".")[0].replace(".", "_") for k in _weights(shapes)]


def test_every_layer_maps_both_ways(trees):
    family, dshapes, nshapes, _ = trees
    for own, other in ((dshapes, nshapes), (nshapes, dshapes)):
        for prefix in ("", "diffusion_model.", "transformer.", "model.diffusion_model."):
            km = build_keymap({prefix + k: s for k, s in own.items()})
            assert km.architecture == family and km.ambiguous == []
            _one_to_one(km, {prefix + k: s for k, s in _weights(own).items()}, _names(other))
            for key in _weights(own):  # own names: the whole weight, by kohya name and by dotted path
                module = key.rpartition(".")[0]
                t = km.lookup("lora_unet_" + module.replace(".", "_"), module)
                assert t is not None and t.weight_key == prefix + key and t.rows is None, key


def test_dev_counts(trees):
    family, dshapes, nshapes, _ = trees
    if family != "flux":
        pytest.skip("Flux.1-dev block counts")
    km = build_keymap(nshapes)
    assert len(km.family.blocks(km.family.config(nshapes, "native"))) == 19 + 38
    assert km.block_of("lora_unet_single_transformer_blocks_37_proj_mlp") == "single_blocks.37"
    assert km.block_of("lora_unet_double_blocks_18_img_attn_qkv") == "double_blocks.18"
    assert sum(1 for k in nshapes if k.endswith("linear1.weight")) == 38
