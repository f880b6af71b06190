"""The KeyMap contract: aliases, dotted paths first, ambiguity, architecture of partial roots."""
from __future__ import annotations

import pytest

from lora_engine.keymap import build_keymap
from tests.fixtures.models.hosts import a1111_root, comfy_clip_state_dict, comfy_unet_state_dict, diffusers_root, shapes


def test_te1_is_an_alias_of_te(tiny_models):
    km = build_keymap(shapes(diffusers_root(tiny_models["sdxl"]).state_dict()))
    a = km.lookup("lora_te_text_model_encoder_layers_1_mlp_fc2")
    assert a is not None and a == km.lookup("lora_te1_text_model_encoder_layers_1_mlp_fc2")
    assert a.weight_key == "text_encoder.encoder.layers.1.mlp.fc2.weight" and a.component == "te"
    b = km.lookup("lora_te2_text_model_encoder_layers_1_mlp_fc2")
    assert b.weight_key == "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.weight"


def test_dotted_path_wins_and_name_is_fallback(tiny_models):
    km = build_keymap(shapes(a1111_root(tiny_models["sd1"]).state_dict()))
    by_dotted = km.lookup("lora_unet_whatever", "down_blocks.0.resnets.0.conv1")
    assert by_dotted.weight_key == "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert km.lookup("lora_unet_conv_in", "no.such.path").weight_key == "model.diffusion_model.input_blocks.0.0.weight"
    # A dotted path only counts inside its own component.
    assert km.lookup("lora_te_x", "down_blocks.0.resnets.0.conv1") is None


def test_norm_targets_carry_bias(tiny_models):
    km = build_keymap(shapes(a1111_root(tiny_models["sd2"]).state_dict()))
    t = km.lookup("lora_unet_down_blocks_0_resnets_0_norm1")
    assert t.weight_key.endswith("input_blocks.1.0.in_layers.0.weight")
    assert t.bias_key.endswith("input_blocks.1.0.in_layers.0.bias") and len(t.shape) == 1
    ln = km.lookup("lora_te_text_model_encoder_layers_0_layer_norm1")
    assert ln.weight_key == "cond_stage_model.model.transformer.resblocks.0.ln_1.weight"
    q = km.lookup("lora_te_text_model_encoder_layers_0_self_attn_v_proj")
    assert q.weight_key.endswith("resblocks.0.attn.in_proj_weight") and q.rows == (32, 48)
    assert q.bias_key.endswith("resblocks.0.attn.in_proj_bias") and q.shape == (16, 16)


def test_ambiguous_names_are_dropped_but_dotted_paths_still_resolve():
    keys = {"unet.time_embedding.linear_1.weight": (4, 4), "unet.mid_block.resnets.0.conv1.weight": (4, 4, 3, 3),
            "unet.mid_block.resnets_0.conv1.weight": (4, 4, 3, 3)}
    km = build_keymap(keys)
    assert km.ambiguous == ["lora_unet_mid_block_resnets_0_conv1"]
    assert km.lookup("lora_unet_mid_block_resnets_0_conv1") is None
    t = km.lookup("lora_unet_mid_block_resnets_0_conv1", "mid_block.resnets.0.conv1")
    assert t.weight_key == "unet.mid_block.resnets.0.conv1.weight"


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_architecture_of_partial_comfy_roots(tiny_models, arch):
    """ComfyUI keeps the UNet and the CLIP in two patchers; each alone still tells the family."""
    assert build_keymap(shapes(comfy_unet_state_dict(tiny_models[arch]))).architecture == arch
    assert build_keymap(shapes(comfy_clip_state_dict(tiny_models[arch]))).architecture == arch


def test_unknown_root():
    km = build_keymap({"encoder.conv_in.weight": (4, 3, 3, 3)})
    assert km.architecture == "unknown" and len(km) == 0
    assert km.lookup("lora_unet_conv_in") is None


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_a1111_hijacked_token_embedding(tiny_models, arch):
    """A1111 wraps the token embedding (``token_embedding.wrapped.weight``); the name still resolves."""
    state = shapes(a1111_root(tiny_models[arch], wrapped=True).state_dict())
    hijacked = {k.replace("token_embedding.weight", "token_embedding.wrapped.weight"): v for k, v in state.items()}
    assert hijacked != state
    km = build_keymap(hijacked)
    t = km.lookup("lora_te_text_model_embeddings_token_embedding")
    assert t is not None and t.weight_key.endswith("token_embedding.wrapped.weight")
    assert km.architecture == arch


def test_clip_vision_tower_is_not_a_text_encoder(tiny_models):
    """An IP-Adapter image encoder (CLIP vision, same embedding names) in the pipeline changes nothing."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=8, patch_size=4))
    root = diffusers_root(tiny_models["sdxl"])
    plain = build_keymap(shapes(root.state_dict()))
    state = shapes(root.state_dict()) | {"image_encoder." + k: v for k, v in shapes(vision.state_dict()).items()}
    km = build_keymap(state)
    assert km.te_prefixes == plain.te_prefixes == ("text_encoder.", "text_encoder_2.")
    assert km.names() == plain.names()
