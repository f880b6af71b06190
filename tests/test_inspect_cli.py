"""`lora-engine inspect FILE… --json` on real files written by peft / diffusers: format, architecture
(from shapes when there is no metadata, from ss_base_model_version / modelspec.architecture when there
is), adapter types with counts, rank/alpha summary, metadata, keys not understood."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine.apps.cli import main as cli_main
from tests.fixtures.files.peft_oracle import TE_LINEARS, UNET_CONVS, UNET_LINEARS, adapted_models
from tests.fixtures.models.oracle import tiny_unet


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


def _lycoris_te_file(path, algo: str, hidden: int, **kw):
    """lycoris-lora's writer on a CLIP text encoder of width ``hidden``, keys named as kohya-style trainers
    name text-encoder modules (``lora_te_text_model_…``)."""
    import logging

    from lycoris import create_lycoris

    from tests.fixtures.models.oracle import tiny_clip

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    net = create_lycoris(tiny_clip(0, hidden=hidden), 1.0, linear_dim=2, linear_alpha=1.0, algo=algo, **kw)
    net.apply_to()
    net.save_weights(str(path), torch.float32, {})
    sd = load_file(str(path))
    assert all(k.startswith("lycoris_encoder_") for k in sd)
    save_file({k.replace("lycoris_", "lora_te_text_model_", 1): v for k, v in sd.items()}, str(path))
    return path


def _kohya_oft_file(path, unet):
    """A UNet OFT file laid out as sd-scripts' ``networks/oft.py`` writes it: ``oft_unet_<module path>`` for every
    Linear / 1x1 conv inside the Transformer2DModel blocks, ``oft_blocks`` (num_blocks, b, b) over the output
    rows and a scalar ``alpha`` (the constraint)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, block in unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for child, m in block.named_modules():
            conv1x1 = isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
            if isinstance(m, torch.nn.Linear) or conv1x1:
                out = m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
                key = ("oft_unet." + name + "." + child).replace(".", "_")
                sd[f"{key}.oft_blocks"] = torch.randn(4, out // 4, out // 4, generator=g) * 0.01
                sd[f"{key}.alpha"] = torch.tensor(1e-3)
    save_file(sd, str(path))
    return path


def test_family_from_oft_ia3_glora_widths(tmp_path, capsys):
    """Files without metadata whose adapters are not LoRA factors: their own tensor widths tell the family."""
    from tests.fixtures.models.tiny_sd import tiny_unet as family_unet

    files = {}
    for algo, kw in (("ia3", {}), ("glora", {}), ("diag-oft", dict(block_size=4))):
        for hidden, arch in ((768, "sd1"), (1024, "sd2")):
            files[_lycoris_te_file(tmp_path / f"{algo}-{hidden}.safetensors", algo, hidden, **kw)] = \
                (arch, f"width {hidden}", algo.replace("diag-", ""))
    from tests.fixtures.files.writers import lycoris_file  # lycoris' writer on a UNet whose context is 1024 wide

    glora_unet = tmp_path / "glora-unet.safetensors"
    save_file(load_file(lycoris_file(glora_unet, seed=1, algo="glora")), str(glora_unet))  # no metadata
    oft_xl = _kohya_oft_file(tmp_path / "oft-sdxl.safetensors", family_unet("sdxl"))
    oft_sd1 = _kohya_oft_file(tmp_path / "oft-sd1.safetensors", family_unet("sd1"))
    summaries = _inspect(capsys, *files, glora_unet, oft_xl, oft_sd1)
    for s, (arch, source, kind) in zip(summaries, files.values()):
        assert (s["architecture"], s["adapter_types"].keys()) == (arch, {kind}), s["path"]
        assert source in s["architecture_source"] and s["metadata"] == {}
    glora, xl, sd1 = summaries[len(files):]
    assert (glora["architecture"], glora["architecture_source"]) == ("unknown", "SD1/SD2 UNet layout; no width that "
                                                                      "tells the two apart")  # tiny context width 32
    assert xl["architecture"] == "sdxl" and "transformer depth" in xl["architecture_source"]
    assert xl["adapter_types"] == {"oft": xl["modules"]} and xl["modules"] > 10
    assert sd1["architecture"] == "unknown" and "SD1/SD2 UNet layout" in sd1["architecture_source"]


def test_glora_on_a_unet_tells_the_context_width(tmp_path, capsys):
    import logging

    from lycoris import create_lycoris

    from tests.fixtures.models.oracle import tiny_unet

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    for cross_dim, arch in ((1024, "sd2"), (2048, "sdxl")):
        net = create_lycoris(tiny_unet(0, cross_dim=cross_dim), 1.0, linear_dim=2, linear_alpha=1.0, algo="glora")
        net.apply_to()
        path = tmp_path / f"glora-{cross_dim}.safetensors"
        net.save_weights(str(path), torch.float32, {})
        (s,) = _inspect(capsys, path)
        assert s["architecture"] == arch and s["architecture_source"] == f"cross-attention context width {cross_dim}"


def test_peft_folders_written_by_convert_keep_modules_and_metadata(tmp_path, capsys):
    """`convert --to peft` of a LoRA on the UNet and the text encoder writes unet/ and text_encoder/ PEFT
    folders; inspect reads the folder as one LoRA, and the source's ss_* metadata survives every format
    (titled by the written file, as every tool titles its output)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict

    models = adapted_models(9, dict(r=4, lora_alpha=4, target_modules=UNET_LINEARS),
                            dict(r=2, lora_alpha=2, target_modules=TE_LINEARS), cross_dim=64)
    sd = {}
    for comp, m in models.items():
        sd.update(convert_state_dict_to_kohya({f"{comp}.{k}": v for k, v in get_peft_model_state_dict(m).items()}))
    src = tmp_path / "kohya.safetensors"
    meta = {"ss_base_model_version": "sd_v1", "ss_output_name": "styled", "modelspec.title": "styled"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src), metadata=meta)
    assert cli_main(["convert", str(src), "-o", str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["text_encoder", "unet"]
    assert cli_main(["convert", str(src), "-o", str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert cli_main(["convert", str(tmp_path / "peft"), "-o", str(tmp_path / "back.safetensors"), "--to", "kohya"]) == 0
    capsys.readouterr()
    kohya, peft, diffusers, back = _inspect(capsys, src, tmp_path / "peft", tmp_path / "d.safetensors",
                                            tmp_path / "back.safetensors")
    assert peft["error"] is None and peft["format"] == "peft"
    for s, title in ((peft, "peft"), (diffusers, "d"), (back, "back")):
        assert (s["architecture"], s["architecture_source"]) == ("sd1", "metadata"), s["path"]
        # the metadata travels; the title is the written file's own name (tools title their outputs)
        assert {k: s["metadata"][k] for k in meta} == dict(meta, ss_output_name=title, **{"modelspec.title": title})
        assert s["modules"] == kohya["modules"] and _blocks(s) == _blocks(kohya), s["path"]


def _blocks(s) -> dict:
    """Blocks with one name for a lone text encoder (diffusers' kohya converter spells it te1)."""
    return {("te" if k == "te1" else k): v for k, v in s["blocks"].items()}


def test_closed_pipe_is_quiet(tmp_path):
    """`lora-engine inspect … | head -1`: no traceback when the reader goes away."""
    import os
    import subprocess
    import sys

    path, _ = _pipeline_file(tmp_path, cross_dim=768)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "lora_engine", "inspect", "--json"] + [str(path)] * 300,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.readline()
    proc.stdout.close()  # like head -1 exiting: the rest (far more than a pipe buffer) has nowhere to go
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and first.startswith(b"[")
    assert err == b"", err[-2000:]
