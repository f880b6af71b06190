"""Pipeline-level LoRA files written by diffusers 0.42.1, read by lora-engine; the oracle is the forward of
the PEFT layers the writer's models carry (UNet2DConditionModel, CLIPTextModel, CLIPTextModelWithProjection).

What diffusers 0.42.1 writes (checked here, not assumed): keys ``unet.<path>.lora_A.weight`` /
``text_encoder.…`` / ``text_encoder_2.…``, and — when ``*_lora_adapter_metadata`` is passed — one header
entry ``lora_adapter_metadata`` holding JSON of every component's LoraConfig flattened with a component
prefix (``{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, "text_encoder.r": …}``).
Also covered: ``convert_state_dict_to_diffusers`` (``lora.down`` / ``lora_linear_layer`` forms),
``convert_state_dict_to_kohya`` (its limits: α written as the rank, text encoder named ``lora_te1_``),
and the old attention-processor form, which no current code writes (hand-built, checked against the
same weights in kohya form and against diffusers' own old→PEFT key converter).

Tolerance: rtol 1e-4 / atol 1e-5·max|y| in fp32 (see tests/formats/peft_oracle.py); a wrong α, pattern
or component gives errors of order 1e-2 or more.
"""
from __future__ import annotations

import json

import pytest
import torch

from lora_engine.formats import load_lora
from tests.fixtures.files.peft_oracle import (TE_LINEARS, UNET_CONVS, UNET_LINEARS, adapted_models, by_dotted,
                                       compare_with_peft_layers)

UNET_CFG = dict(r=4, lora_alpha=8, target_modules=UNET_LINEARS + UNET_CONVS, rank_pattern={"to_v": 2},
                alpha_pattern={"conv1": 3})
TE_CFG = dict(r=2, lora_alpha=5, target_modules=TE_LINEARS)
TE2_CFG = dict(r=3, lora_alpha=1, use_rslora=True, target_modules=TE_LINEARS + ["text_projection"])


def _adapted(seed: int, unet_cfg=UNET_CFG, te_cfg=TE_CFG, te2_cfg=None):
    return adapted_models(seed, unet_cfg, te_cfg, te2_cfg)


def _layers(models, convert=None) -> dict:
    from peft import get_peft_model_state_dict

    out = {}
    for comp, model in models.items():
        sd = get_peft_model_state_dict(model)
        out[comp] = convert(sd) if convert else sd
    return out


def _meta(models) -> dict:
    return {comp: m.peft_config["default"].to_dict() for comp, m in models.items()}


def _check(models, lf, prefixes: dict[str, tuple[str, ...]]) -> None:
    assert not lf.problems and not lf.unknown_keys, (lf.problems, lf.unknown_keys[:5])
    total = 0
    for comp, model in models.items():
        total += compare_with_peft_layers(model, by_dotted(lf, prefixes[comp]), what=f"{lf.format} {comp}")
    assert total == len(lf.modules)


def test_sd_pipeline_save_lora_weights_with_metadata(tmp_path):
    from diffusers import StableDiffusionPipeline

    models = _adapted(seed=1)
    layers, meta = _layers(models), _meta(models)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta["text_encoder"])
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lf = load_lora(path)
    assert lf.format == "diffusers"
    header = json.loads(lf.metadata["lora_adapter_metadata"])  # the real format, as documented above
    assert header["unet.lora_alpha"] == 8 and header["text_encoder.lora_alpha"] == 5
    assert header["unet.rank_pattern"] == {"to_v": 2} and header["unet.alpha_pattern"] == {"conv1": 3}
    _check(models, lf, {"unet": ("lora_unet_",), "text_encoder": ("lora_te_",)})


def test_sdxl_pipeline_save_lora_weights_three_components(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    models = _adapted(seed=2, te2_cfg=TE2_CFG)
    layers, meta = _layers(models), _meta(models)
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=meta["unet"],
        text_encoder_lora_adapter_metadata=meta["text_encoder"],
        text_encoder_2_lora_adapter_metadata=meta["text_encoder_2"])
    lf = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert "lora_te2_text_projection" in lf.modules
    _check(models, lf, {"unet": ("lora_unet_",), "text_encoder": ("lora_te1_",), "text_encoder_2": ("lora_te2_",)})


def test_pipeline_file_without_metadata_means_alpha_equals_rank(tmp_path):
    """Older diffusers wrote no header; α = r is then the only reading, right when the trainer used α = r."""
    from diffusers import StableDiffusionPipeline

    models = _adapted(seed=3, unet_cfg=dict(r=4, lora_alpha=4, target_modules=UNET_LINEARS),
                      te_cfg=dict(r=2, lora_alpha=2, target_modules=TE_LINEARS))
    layers = _layers(models)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=layers["unet"],
                                              text_encoder_lora_layers=layers["text_encoder"])
    lf = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert "lora_adapter_metadata" not in lf.metadata
    _check(models, lf, {"unet": ("lora_unet_",), "text_encoder": ("lora_te_",)})


def test_convert_state_dict_to_diffusers_forms(tmp_path):
    """``convert_state_dict_to_diffusers`` (older training scripts) writes ``to_q.lora.down.weight`` for the
    UNet and ``q_proj.lora_linear_layer.down.weight`` for the text encoder."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    models = _adapted(seed=4, unet_cfg=dict(r=4, lora_alpha=4, target_modules=UNET_LINEARS),
                      te_cfg=dict(r=2, lora_alpha=2, target_modules=TE_LINEARS))
    layers = _layers(models, convert_state_dict_to_diffusers)
    assert any(".to_q.lora.down.weight" in k for k in layers["unet"])
    assert any(".q_proj.lora_linear_layer.down.weight" in k for k in layers["text_encoder"])
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=layers["unet"],
                                              text_encoder_lora_layers=layers["text_encoder"])
    lf = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    _check(models, lf, {"unet": ("lora_unet_",), "text_encoder": ("lora_te_",)})


@pytest.mark.parametrize("alpha", [4, 8])
def test_convert_state_dict_to_kohya(tmp_path, alpha):
    """diffusers' kohya converter writes ``alpha`` = rank whatever the trainer's lora_alpha was, and names an
    SD1 text encoder ``lora_te1_``. With lora_alpha = r the file is exact; with lora_alpha ≠ r the file
    itself says α/r = 1, and we must read what the file says (ΔW = PEFT's ΔW · r/lora_alpha)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    models = _adapted(seed=5, unet_cfg=dict(r=4, lora_alpha=alpha, target_modules=UNET_LINEARS + UNET_CONVS),
                      te_cfg=dict(r=4, lora_alpha=alpha, target_modules=TE_LINEARS))
    sd = {f"{comp}.{k}": v for comp, m in models.items() for k, v in get_peft_model_state_dict(m).items()}
    kohya = convert_state_dict_to_kohya(sd)
    assert all(k.startswith(("lora_unet_", "lora_te1_")) for k in kohya)
    path = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
    lf = load_lora(path)
    assert lf.format == "kohya"
    assert {m.adapter.scale for m in lf.modules.values()} == {1.0}  # the file's alpha = rank
    assert not lf.problems and not lf.unknown_keys
    if alpha == 4:
        prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_"}
        for comp, model in models.items():
            compare_with_peft_layers(model, _by_kohya_name(lf, model, prefixes[comp]), what=f"kohya {comp}")
    else:
        from tests.fixtures.files.peft_oracle import lora_layers

        dotted, layer = next(lora_layers(models["unet"]))
        ours = lf.modules["lora_unet_" + dotted.replace(".", "_")].adapter.delta(layer.get_base_layer().weight).weight
        with torch.no_grad():
            peft_delta = layer.get_delta_weight("default")
        torch.testing.assert_close(ours * alpha / 4, peft_delta, rtol=1e-5, atol=1e-6)


def _by_kohya_name(lf, model, prefix: str) -> dict:
    """Our modules keyed by the model's dotted paths, found through their kohya names."""
    from tests.fixtures.files.peft_oracle import lora_layers

    return {dotted: lf.modules[prefix + dotted.replace(".", "_")] for dotted, _ in lora_layers(model)}


def test_pipeline_file_with_dora(tmp_path):
    """DoRA through diffusers: ``unet.….lora_magnitude_vector`` (o,) for linears, (1,o,1,1) for convs,
    always per output row."""
    from diffusers import StableDiffusionPipeline

    models = _adapted(seed=6, unet_cfg=dict(r=4, lora_alpha=8, use_dora=True, target_modules=UNET_LINEARS + UNET_CONVS),
                      te_cfg=dict(r=2, lora_alpha=3, use_dora=True, target_modules=TE_LINEARS))
    layers, meta = _layers(models), _meta(models)
    assert any(k.endswith("lora_magnitude_vector") for k in layers["unet"])
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta["text_encoder"])
    lf = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert {m.kind for m in lf.modules.values()} == {"dora"}
    _check(models, lf, {"unet": ("lora_unet_",), "text_encoder": ("lora_te_",)})
