"""A folder of per-component PEFT folders (``unet/``, ``text_encoder/``, as ``convert --to peft`` writes a LoRA
on several models) is one LoRA to every reader: ``load_lora`` gives the same modules and deltas as the kohya
file it was converted from, so hosts, ``generate`` and ``inspect`` take the folder by name."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from lora_engine.formats import load_lora
from lora_engine.library.summary import summarize
from lora_engine.tools.convert import convert

MODULES = [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (32, 32)),
           ("lora_unet_mid_block_attentions_0_proj_in", (64, 64, 1, 1)),
           ("lora_te_text_model_encoder_layers_1_mlp_fc1", (64, 32))]


def _kohya(path):
    g = torch.Generator().manual_seed(7)
    sd = {}
    for i, (name, shape) in enumerate(MODULES):
        r = 2 + i
        sd[f"{name}.lora_down.weight"] = torch.randn(r, *shape[1:], generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g)
        sd[f"{name}.alpha"] = torch.tensor(i + 1.5)
    save_file(sd, str(path))
    return path


def test_component_folders_load_as_the_lora_they_came_from(tmp_path):
    src = _kohya(tmp_path / "k.safetensors")
    convert(src, tmp_path / "peft", "peft")
    want, got = load_lora(src), load_lora(tmp_path / "peft")
    assert got.format == "peft" and sorted(got.modules) == sorted(want.modules) == sorted(n for n, _ in MODULES)
    for name, m in want.modules.items():
        base = torch.zeros(dict(MODULES)[name])
        assert torch.equal(got.modules[name].adapter.delta(base).weight, m.adapter.delta(base).weight), name
    s = summarize(tmp_path / "peft")
    assert s.error is None and s.modules == len(MODULES)


def test_a_component_folder_with_a_bad_part_names_it(tmp_path):
    src = _kohya(tmp_path / "k.safetensors")
    convert(src, tmp_path / "peft", "peft")
    (tmp_path / "peft" / "text_encoder" / "adapter_config.json").write_text("{broken")
    s = summarize(tmp_path / "peft")
    assert s.error and "text_encoder" in s.error and "adapter_config.json" in s.error
