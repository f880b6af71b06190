"""Unmatched names get one line that says what went wrong."""
from __future__ import annotations

import pytest

from lora_engine.keymap import build_keymap
from tests.fixtures.models.hosts import a1111_root, comfy_unet_state_dict, diffusers_root, shapes


def _keymap(model, host="a1111"):
    root = a1111_root(model) if host == "a1111" else diffusers_root(model)
    return build_keymap(shapes(root.state_dict()))


def _unmatched(names, km):
    return [n for n in names if km.lookup(n) is None]


@pytest.mark.parametrize("lora_arch,model_arch,expect", [
    ("sdxl", "sd1", "SDXL LoRA on an SD1.x model"),
    ("sdxl", "sd2", "SDXL LoRA on an SD2.x model"),
    ("sd1", "sdxl", "SD1.x/SD2.x LoRA on an SDXL model"),
])
def test_family_mismatch(tiny_models, lora_arch, model_arch, expect):
    """Names of one family's map, applied to another family's model."""
    names = _keymap(tiny_models[lora_arch], "diffusers").names()
    km = _keymap(tiny_models[model_arch])
    unmatched = _unmatched(names, km)
    assert unmatched
    line = km.diagnose(unmatched)
    assert line.startswith(expect) and "\n" not in line
    assert f"{len(unmatched)} keys matched no module" in line


def test_sd2_text_encoder_on_sd1(tiny_models):
    km = _keymap(tiny_models["sd1"])
    names = [f"lora_te_text_model_encoder_layers_{i}_mlp_fc1" for i in range(23)]
    assert km.diagnose(_unmatched(names, km)).startswith("SD2.x LoRA on an SD1.x model")


def test_flux_on_sdxl(tiny_models):
    km = _keymap(tiny_models["sdxl"])
    assert km.diagnose(["lora_unet_double_blocks_0_img_attn_qkv"]).startswith("Flux.1 LoRA on an SDXL model")


def test_openclip_native_te_names_on_clip_l(tiny_models):
    km = _keymap(tiny_models["sd1"])
    names = ["lora_te_model_transformer_resblocks_0_mlp_c_fc", "lora_te_model_transformer_resblocks_0_attn_in_proj"]
    assert _unmatched(names, km) == names
    assert km.diagnose(names).startswith("text-encoder keys for OpenCLIP on a CLIP-L model")


def test_te_names_on_unet_only_root(tiny_models):
    km = build_keymap(shapes(comfy_unet_state_dict(tiny_models["sd1"])))
    assert km.diagnose(["lora_te_text_model_encoder_layers_0_mlp_fc1"]).startswith(
        "text-encoder keys but this model part has no text encoder")


def test_generic(tiny_models):
    km = _keymap(tiny_models["sd1"])
    assert km.diagnose(["lora_unet_nothing_here"]) == "1 key matched no module (e.g. lora_unet_nothing_here)"
    assert km.diagnose([]) == "all keys matched"
