"""`lora-engine inspect FILE… --json` on real files written by peft / diffusers: format, architecture
(from shapes when there is no metadata, from ss_base_model_version / modelspec.architecture when there
is), adapter types with counts, rank/alpha summary, metadata, keys not understood."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine.apps.cli import main as cli_main
from tests.formats.peft_oracle import TE_LINEARS, UNET_CONVS, UNET_LINEARS, adapted_models
from tests.oracle_models import tiny_unet


def _inspect(capsys, *paths) -> list[dict]:
    rc = cli_main(["inspect", *map(str, paths), "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def _pipeline_file(tmp_path, cross_dim: int, sdxl: bool = False, with_meta: bool = True):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import get_peft_model_state_dict

    unet_cfg = dict(r=4, lora_alpha=8, target_modules=UNET_LINEARS + UNET_CONVS, rank_pattern={"to_v": 2},
                    alpha_pattern={"conv1": 3})
    te_cfg = dict(r=2, lora_alpha=2, target_modules=TE_LINEARS)
    models = adapted_models(7, unet_cfg, te_cfg, te_cfg if sdxl else None, cross_dim=cross_dim)
    kw = {f"{c}_lora_layers": get_peft_model_state_dict(m) for c, m in models.items()}
    if with_meta:
        kw.update({f"{c}_lora_adapter_metadata": m.peft_config["default"].to_dict() for c, m in models.items()})
    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(str(tmp_path), **kw)
    return tmp_path / "pytorch_lora_weights.safetensors", models


def test_diffusers_file_sd2_from_shapes(tmp_path, capsys):
    path, models = _pipeline_file(tmp_path, cross_dim=1024)
    (s,) = _inspect(capsys, path)
    assert s["error"] is None and s["format"] == "diffusers"
    assert s["architecture"] == "sd2" and "1024" in s["architecture_source"]
    n_unet = sum(1 for n, m in models["unet"].named_modules() if hasattr(m, "lora_A"))
    n_te = sum(1 for n, m in models["text_encoder"].named_modules() if hasattr(m, "lora_A"))
    assert s["adapter_types"] == {"lora": n_unet + n_te} and s["modules"] == n_unet + n_te
    down0 = s["blocks"]["unet down_blocks_0"]
    assert down0["ranks"] == [2, 4]  # rank_pattern to_v = 2
    assert 8.0 in down0["alphas"] and 3.0 in down0["alphas"]  # lora_alpha 8, alpha_pattern conv1 = 3
    assert s["blocks"]["te"] == {"modules": n_te, "ranks": [2], "alphas": [2.0]}
    meta = json.loads(s["metadata"]["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8
    assert s["unknown_keys"] == [] and s["problems"] == []


def test_sdxl_from_second_text_encoder(tmp_path, capsys):
    path, _ = _pipeline_file(tmp_path, cross_dim=64, sdxl=True, with_meta=False)
    (s,) = _inspect(capsys, path)
    assert s["architecture"] == "sdxl" and "second text encoder" in s["architecture_source"]
    assert {"te1", "te2"} <= set(s["blocks"])
    assert s["metadata"] == {"format": "pt"}


def test_peft_folder_sd1_from_shapes_with_dora(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_unet(seed=3, cross_dim=768), LoraConfig(r=4, lora_alpha=4, use_dora=True,
                                                                     init_lora_weights=False,
                                                                     target_modules=["to_k", "to_v", "conv1"]))
    pm.save_pretrained(str(tmp_path / "peft"))
    (s,) = _inspect(capsys, tmp_path / "peft")
    assert s["format"] == "peft" and s["architecture"] == "sd1" and "768" in s["architecture_source"]
    n = sum(1 for _, m in pm.named_modules() if hasattr(m, "lora_magnitude_vector") and len(m.lora_magnitude_vector))
    assert s["adapter_types"] == {"dora(lora)": n}


@pytest.mark.parametrize("meta,arch", [({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
                                       ({"ss_base_model_version": "sd_v1"}, "sd1"),
                                       ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
                                       ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl")])
def test_architecture_from_metadata_wins_over_shapes(tmp_path, capsys, meta, arch):
    """A kohya file (diffusers' own converter) whose shapes say sd2 (context 1024); its metadata decides."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict

    models = adapted_models(9, dict(r=4, lora_alpha=4, target_modules=UNET_LINEARS), dict(r=2, lora_alpha=2,
                            target_modules=TE_LINEARS), cross_dim=1024)
    sd = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(models["unet"]).items()})
    path = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    (shapes_only,) = _inspect(capsys, _resave(tmp_path, path, {}))
    assert shapes_only["architecture"] == "sd2"
    (s,) = _inspect(capsys, path)
    assert s["format"] == "kohya" and s["architecture"] == arch and s["architecture_source"] == "metadata"
    assert s["metadata"] == meta


def _resave(tmp_path, path, meta):
    out = tmp_path / "nometa.safetensors"
    save_file(load_file(str(path)), str(out), metadata=meta)
    return out


def test_unknown_keys_and_several_files(tmp_path, capsys):
    path, _ = _pipeline_file(tmp_path, cross_dim=768)
    sd = load_file(str(path))
    sd["unet.some_new_thing.scale_shift"] = torch.zeros(3)
    sd["text_encoder.text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 4)  # bare weight: not ours
    other = tmp_path / "extra.safetensors"
    save_file(sd, str(other))
    s1, s2 = _inspect(capsys, path, other)
    assert s1["unknown_keys"] == []
    assert sorted(s2["unknown_keys"]) == ["text_encoder.text_model.embeddings.token_embedding.weight",
                                          "unet.some_new_thing.scale_shift"]
    assert s2["modules"] == s1["modules"] and s2["architecture"] == "sd1"
