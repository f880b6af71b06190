"""The block correspondence itself: both namings give the same units; translation round-trips;
known landmarks (including the SDXL upsampler slot A1111 gets wrong)."""
from __future__ import annotations

import functools

import pytest

from lora_engine.keymap import build_keymap
from lora_engine.families.sd_unet import UNetNaming, layout_from_diffusers, layout_from_ldm
from tests.fixtures.models.full_sd import build_full
from tests.fixtures.models.hosts import a1111_root, shapes
from tests.fixtures.models.ldm_view import ldm_unet_view
from tests.fixtures.models.tiny_sd import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_layouts_agree(tiny_models, arch):
    unet = tiny_models[arch].unet
    from_d = layout_from_diffusers(unet.state_dict())
    from_l = layout_from_ldm(ldm_unet_view(unet).state_dict())
    assert from_d == from_l
    assert {u.kind for u in from_d} == {"resnet", "attention", "down", "up"}


@pytest.mark.parametrize("arch", ARCHS)
def test_translation_round_trips(tiny_models, arch):
    unet = tiny_models[arch].unet
    naming = UNetNaming.from_paths(unet.state_dict(), "diffusers")
    ldm_paths = {id(m): p for p, m in ldm_unet_view(unet).named_modules()}
    for path, module in unet.named_modules():
        if hasattr(module, "weight") and module.weight is not None:
            ldm = naming.to_ldm(path)
            assert ldm == ldm_paths[id(module)], path
            assert naming.to_diffusers(ldm) == path


@functools.lru_cache(maxsize=None)
def _full_keymap(arch):
    return build_keymap(shapes(a1111_root(build_full(arch)).state_dict()))


@pytest.mark.parametrize("arch,name,ldm", [
    ("sd1", "lora_unet_up_blocks_0_upsamplers_0_conv", "output_blocks.2.1.conv"),
    ("sd1", "lora_unet_up_blocks_1_upsamplers_0_conv", "output_blocks.5.2.conv"),
    ("sd1", "lora_unet_down_blocks_2_downsamplers_0_conv", "input_blocks.9.0.op"),
    ("sd1", "lora_unet_mid_block_resnets_1_conv_shortcut", None),
    ("sd1", "lora_unet_mid_block_resnets_1_time_emb_proj", "middle_block.2.emb_layers.1"),
    ("sd1", "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
     "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj"),
    ("sd1", "lora_unet_time_embedding_linear_2", "time_embed.2"),
    ("sd1", "lora_unet_conv_out", "out.2"),
    ("sdxl", "lora_unet_up_blocks_0_upsamplers_0_conv", "output_blocks.2.2.conv"),
    ("sdxl", "lora_unet_add_embedding_linear_1", "label_emb.0.0"),
    ("sdxl", "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2", "middle_block.1.transformer_blocks.9.ff.net.2"),
    ("sdxl", "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k",
     "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
    ("sdxl", "lora_unet_input_blocks_3_0_op", "input_blocks.3.0.op"),
])
def test_landmarks(arch, name, ldm):
    target = _full_keymap(arch).lookup(name)
    if ldm is None:
        assert target is None  # SD1's mid-block resnets keep their width: no shortcut
    else:
        assert target.weight_key == f"model.diffusion_model.{ldm}.weight"
