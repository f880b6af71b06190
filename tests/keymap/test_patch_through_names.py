"""Writing through a Target changes the model that runs: ldm names reach the diffusers UNet's
layers, and OpenCLIP row slices are q, k, v in that order (checked by running both encoders)."""
from __future__ import annotations

import torch

from lora_engine.keymap import build_keymap
from tests.fixtures.models.hosts import a1111_root, shapes
from tests.fixtures.models.openclip import OpenCLIPText
from tests.fixtures.models.tiny_sd import TinySD


def _unet_out(unet):
    g = torch.Generator().manual_seed(5)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 3, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def test_kohya_name_patches_diffusers_unet_through_ldm_view():
    model = TinySD.build("sd1")
    root = a1111_root(model)
    params = dict(root.named_parameters())
    km = build_keymap(shapes(root.state_dict()))
    target = km.lookup("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v")
    assert target.weight_key == "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_v.weight"
    before = _unet_out(model.unet)
    layer = model.unet.down_blocks[0].attentions[1].transformer_blocks[0].attn2.to_v
    original = layer.weight.detach().clone()
    with torch.no_grad():
        params[target.weight_key].add_(0.5)
    assert torch.equal(layer.weight, original + 0.5)
    assert not torch.allclose(_unet_out(model.unet), before)
    with torch.no_grad():
        params[target.weight_key].copy_(original)
    assert torch.equal(_unet_out(model.unet), before)


def test_openclip_rows_are_q_k_v():
    model = TinySD.build("sd2")
    hf = model.text_encoders[0]
    tower = OpenCLIPText.from_hf(hf)
    km = build_keymap(shapes({"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()}))
    params = {"cond_stage_model.model." + k: v for k, v in tower.named_parameters()}
    tokens = torch.randint(0, hf.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for proj in ("q_proj", "k_proj", "v_proj"):
            t = km.lookup(f"lora_te_text_model_encoder_layers_1_self_attn_{proj}")
            hf_layer = getattr(hf.text_model.encoder.layers[1].self_attn if hasattr(hf, "text_model")
                               else hf.encoder.layers[1].self_attn, proj)
            delta = torch.randn(t.shape, generator=g) * 0.3
            hf_layer.weight.add_(delta)
            params[t.weight_key][t.rows[0]:t.rows[1]].add_(delta)
            params[t.bias_key][t.rows[0]:t.rows[1]].add_(1.0)
            hf_layer.bias.add_(1.0)
        torch.testing.assert_close(tower(tokens), hf(tokens).last_hidden_state, rtol=1e-5, atol=1e-5)
