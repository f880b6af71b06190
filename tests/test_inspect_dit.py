"""`lora-engine inspect` names the family and the dialect of Flux.1 / SD3 LoRA files: kohya, ComfyUI-native,
diffusers/PEFT (written by peft + diffusers), XLabs, OneTrainer, fal (``base_model.model.``), BFL control,
DiffSynth, LyCORIS (``lycoris_``), DoRA; kohya SD3."""
from __future__ import annotations

import json

import pytest
import torch

from lora_engine.engine import shapes_of
from lora_engine.library.summary import summarize
from tests.fixtures.files.flux import native_lora, peft_file, write, xlabs_lora
from tests.fixtures.models.flux import TINY_SD3, NativeTree, flux_model, native_state, sd3_model

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def nshapes():
    return shapes_of(NativeTree(native_state(flux_model(seed=1))))


def _pair(key: str, o: int, i: int, down="lora_down", up="lora_up") -> dict:
    g = torch.Generator().manual_seed(len(key))
    return {f"{key}.{down}.weight": torch.randn(2, i, generator=g), f"{key}.{up}.weight": torch.randn(o, 2, generator=g)}


def _rows(nshapes, module):
    return nshapes[module + ".weight"]


def _files(tmp_path, nshapes) -> dict[str, tuple[str, str, str]]:
    """{case: (path, dialect, architecture)}"""
    qkv = _rows(nshapes, "double_blocks.0.img_attn.qkv")
    h = qkv[1]
    out = {
        "kohya": (write(native_lora(nshapes, 1, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"]),
                        tmp_path / "k.safetensors"), "kohya", "flux"),
        "comfy": (write(native_lora(nshapes, 1, ["double_blocks.0.img_attn.qkv"], spelling="comfyui"),
                        tmp_path / "c.safetensors"), "ComfyUI-native", "flux"),
        "xlabs": (write(xlabs_lora(nshapes, 1), tmp_path / "x.safetensors"), "XLabs", "flux"),
        "onetrainer": (write(_pair("lora_transformer_single_transformer_blocks_0_attn_to_q", h, h)
                             | _pair("lora_transformer_transformer_blocks_0_attn_to_q", h, h), tmp_path / "o.safetensors"),
                       "OneTrainer", "flux"),
        "fal": (write(_pair("base_model.model.single_transformer_blocks.0.attn.to_q", h, h, "lora_A", "lora_B"),
                      tmp_path / "f.safetensors"), "fal", "flux"),
        "bfl": (write(_pair("double_blocks.0.img_attn.qkv", qkv[0], h, "lora_A", "lora_B")
                      | {"double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16)}, tmp_path / "b.safetensors"),
                "BFL", "flux"),
        "diffsynth": (write(_pair("single_transformer_blocks.0.attn.to_q", h, h, "lora_A", "lora_B"),
                            tmp_path / "s.safetensors"), "DiffSynth", "flux"),
        "lycoris": (write({"lycoris_single_transformer_blocks_0_attn_to_q.hada_w1_a": torch.randn(h, 2),
                           "lycoris_single_transformer_blocks_0_attn_to_q.hada_w1_b": torch.randn(2, h),
                           "lycoris_single_transformer_blocks_0_attn_to_q.hada_w2_a": torch.randn(h, 2),
                           "lycoris_single_transformer_blocks_0_attn_to_q.hada_w2_b": torch.randn(2, h),
                           "lycoris_single_transformer_blocks_0_attn_to_q.alpha": torch.tensor(2.0)},
                          tmp_path / "l.safetensors"), "LyCORIS", "flux"),
    }
    dora = native_lora(nshapes, 2, ["double_blocks.0.img_attn.proj"])
    dora["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(h, 1)
    out["dora"] = (write(dora, tmp_path / "d.safetensors"), "kohya+DoRA", "flux")
    sd3 = shapes_of(NativeTree(native_state(sd3_model(TINY_SD3, seed=1), "sd3")))
    out["sd3"] = (write(native_lora(sd3, 1, ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.mlp.fc1"]),
                        tmp_path / "sd3.safetensors"), "kohya", "sd3")
    return out


def test_family_and_dialect(tmp_path, nshapes):
    for case, (path, dialect, arch) in _files(tmp_path, nshapes).items():
        s = summarize(path)
        assert s.error is None, (case, s.error)
        assert (s.dialect, s.architecture) == (dialect, arch), case


def test_diffusers_file_from_the_real_writers(tmp_path):
    peft_file(flux_model(seed=1), tmp_path, seed=1)
    s = summarize(tmp_path / "pytorch_lora_weights.safetensors")
    assert (s.format, s.dialect, s.architecture) == ("diffusers", "diffusers/PEFT", "flux")


def test_cli_prints_dialect(tmp_path, nshapes, capsys):
    from lora_engine.apps.cli import main

    files = _files(tmp_path, nshapes)
    assert main(["inspect", files["xlabs"][0], files["comfy"][0]]) == 0
    text = capsys.readouterr().out
    assert "dialect: XLabs" in text and "dialect: ComfyUI-native" in text and "architecture: flux" in text
    assert main(["inspect", "--json", files["sd3"][0]]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    assert got["dialect"] == "kohya" and got["architecture"] == "sd3"


@pytest.mark.parametrize("names, family", [
    (["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_final_layer_linear"], "sd3"),
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_final_layer_linear"], "flux"),
    (["lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_single_transformer_blocks_0_proj_mlp"], "flux"),
    (["lora_unet_transformer_blocks_0_attn2_to_q"], "sd3"),
    (["lora_unet_transformer_blocks_0_attn_to_q", "lora_te2_encoder_block_0_layer_0_SelfAttention_q"], "flux"),
    (["lora_unet_transformer_blocks_0_attn_to_q", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"], "sd3"),
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_distilled_guidance_layer_in_proj"], "chroma"),
    (["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"], None),
])
def test_family_from_names(names, family):
    from lora_engine.families.lora_names import family_from_names

    got = family_from_names(names, {})
    assert (got.name if got else None) == family


def test_names_that_fit_both_families():
    from lora_engine.families.lora_names import AmbiguousFamily, family_from_names

    with pytest.raises(AmbiguousFamily):
        family_from_names(["lora_unet_transformer_blocks_0_attn_to_q"], {})
    assert family_from_names(["lora_unet_transformer_blocks_0_attn_to_q"],
                             {"modelspec.architecture": "flux-1-dev/lora"}).name == "flux"
