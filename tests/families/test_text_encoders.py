"""Flux's text encoders (CLIP-L, T5) in a pipeline-shaped root: kohya ``lora_te1_`` (CLIP-L) and
``lora_te3_`` (T5), OneTrainer's ``lora_te2_`` (T5), diffusers ``text_encoder_2.`` (T5) all land on the
right weight with ΔW = α/r · up · down."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from tests.fixtures.files.flux import write
from tests.fixtures.models.flux import flux_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    root = nn.Module()
    root.transformer, root.text_encoder, root.text_encoder_2 = flux_model(seed=1), clip, t5
    return root


T5_Q = "encoder.block.1.layer.0.SelfAttention.q"


@pytest.mark.parametrize("key", [
    "lora_te3_" + T5_Q.replace(".", "_"), "lora_te2_" + T5_Q.replace(".", "_"), "text_encoder_2." + T5_Q])
def test_t5_spellings(pipe, tmp_path, key):
    km = build_keymap(shapes_of(pipe))
    assert km.architecture == "flux"
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    dotted = key.startswith("text_encoder_2.")
    tensors = {f"{key}.{'lora_A' if dotted else 'lora_down'}.weight": down, f"{key}.{'lora_B' if dotted else 'lora_up'}.weight": up}
    scale = 1.0
    if not dotted:
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
        scale = 0.5
    clip_key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    tensors[clip_key + ".lora_down.weight"], tensors[clip_key + ".lora_up.weight"] = down.clone(), up.clone()
    lf = load_lora(write(tensors, tmp_path / "te.safetensors"))
    w_t5 = pipe.text_encoder_2.encoder.block[1].layer[0].SelfAttention.q.weight
    layers = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).encoder.layers
    w_clip = layers[0].self_attn.q_proj.weight
    before = (w_t5.clone(), w_clip.clone())
    engine = LoraEngine(pipe, km, mode="merged")
    plan = engine.set_stack([StackEntry(lf, te=1.0)])
    assert engine.warnings() == [] and next(iter(plan.reports.values())).touched == 2
    assert torch.allclose(w_t5, before[0] + scale * up @ down, atol=1e-6)
    assert torch.allclose(w_clip, before[1] + up @ down, atol=1e-6)
    engine.restore()
    assert torch.equal(w_t5, before[0]) and torch.equal(w_clip, before[1])
