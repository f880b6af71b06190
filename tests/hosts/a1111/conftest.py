"""Fixtures: one tiny SD1 model per session (copied per test, tests write weights), LoRA files written
with safetensors in kohya's layout, and a controller reading them."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from extension.controller import Controller
from extension.network import LoraNetwork
from tests.hosts.a1111.standin import Opts, SDModel
from tests.fixtures.models.tiny_sd import TinySD

# kohya name -> dotted path in TinySD (unet.* / te.*): diffusers- and ldm-style UNet names, HF CLIP names
MODULES_A = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_input_blocks_4_0_in_layers_2": "unet.down_blocks.1.resnets.0.conv1",
    "lora_unet_output_blocks_4_1_proj_in": "unet.up_blocks.1.attentions.1.proj_in",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "te.encoder.layers.0.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc1": "te.encoder.layers.1.mlp.fc1",
}
MODULES_B = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "lora_unet_up_blocks_2_resnets_1_conv2": "unet.up_blocks.2.resnets.1.conv2",
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj": "te.encoder.layers.1.self_attn.v_proj",
}


def module_of(tiny, dotted: str) -> torch.nn.Module:
    root, _, path = dotted.partition(".")
    return (tiny.unet if root == "unet" else tiny.text_encoders[0]).get_submodule(path)


def write_lora(path, tiny, modules: dict[str, str], seed: int, rank: int = 2, alpha: float = 1.0):
    """Random kohya LoRA; returns {dotted: ΔW at strength 1} computed here: (α/r)·up@down reshaped."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name, dotted in modules.items():
        w = module_of(tiny, dotted).weight
        out_f, in_f = w.shape[0], w.shape[1]
        k = tuple(w.shape[2:])
        down = torch.randn(rank, in_f, *k, generator=g) * 0.3
        up = torch.randn(out_f, rank, *([1] * len(k)), generator=g) * 0.3
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[dotted] = (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return deltas


@pytest.fixture(scope="session")
def tiny_sd1():
    return TinySD.build("sd1")


@pytest.fixture
def tiny(tiny_sd1):
    return copy.deepcopy(tiny_sd1)


@pytest.fixture
def sd_model(tiny):
    return SDModel(tiny)


@pytest.fixture
def loras(tmp_path, tiny):
    d = tmp_path / "Lora"
    d.mkdir()
    return d, {"a": write_lora(d / "a.safetensors", tiny, MODULES_A, 1),
               "b": write_lora(d / "b.safetensors", tiny, MODULES_B, 2)}


def make_network(folder, **opts):
    c = Controller(Opts(dict(opts)), [str(folder)], cache_path=None)
    return c, LoraNetwork(c)
