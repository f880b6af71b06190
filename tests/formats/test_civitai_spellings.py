"""Odd spellings found in shared files: a kohya module name with a trailing "_" (Comfy-Org/ComfyUI#4347:
``lora_unet_single_transformer_blocks_6_attn_to_q_.alpha`` beside ``…_to_q.lora_down.weight``) is the same
module, so its alpha is used; without the rule the alpha is an unknown key and the scale silently 1."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from lora_engine.formats import load_lora

NAME = "lora_unet_single_transformer_blocks_6_attn_to_q"


def _file(path, alpha_name: str, down_name: str = NAME):
    g = torch.Generator().manual_seed(3)
    save_file({f"{down_name}.lora_down.weight": torch.randn(4, 16, generator=g),
               f"{down_name}.lora_up.weight": torch.randn(16, 4, generator=g),
               f"{alpha_name}.alpha": torch.tensor(2.0)}, str(path))
    return path


def test_trailing_underscore_alpha_belongs_to_its_module(tmp_path):
    plain = load_lora(_file(tmp_path / "plain.safetensors", NAME))
    odd = load_lora(_file(tmp_path / "odd.safetensors", NAME + "_"))
    both = load_lora(_file(tmp_path / "both.safetensors", NAME + "_", NAME + "_"))
    for lf in (odd, both):
        assert list(lf.modules) == [NAME] and lf.unknown_keys == []
        assert lf.modules[NAME].adapter.scale == plain.modules[NAME].adapter.scale == 0.5
        w = torch.zeros(16, 16)
        assert torch.equal(lf.modules[NAME].adapter.delta(w).weight, plain.modules[NAME].adapter.delta(w).weight)
