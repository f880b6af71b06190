"""convert: kohya ↔ PEFT/diffusers on files written by lycoris-lora and peft.

Oracles: (1) bit-exact round trips, compared tensor by tensor against the source file's own bytes;
(2) the PEFT folder loaded by ``peft.PeftModel.from_pretrained`` / the diffusers file loaded by
diffusers' ``load_lora_adapter`` into a real tiny UNet / CLIP: their forward must equal our engine's
merged model (fp32, different summation order: rtol 1e-4, atol 1e-5·max|y|).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.errors import ToolError
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from lora_engine.tools.convert import convert, dotted_name
from tests.fixtures.models.oracle import tiny_clip, tiny_unet
from tests.fixtures.files.writers import lycoris_file


def _unet_input(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10]), ctx


def _ours(model, lora_path):
    eng = LoraEngine(model, build_keymap(shapes_of(model)))
    plan = eng.set_stack([StackEntry(load_lora(lora_path))])
    assert not eng.warnings(), eng.warnings()
    return plan


def _same_bytes(a: dict, b: dict):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].ndim else a[k], b[k].view(torch.uint8) if b[k].ndim else b[k]), k


@pytest.mark.parametrize("case", [dict(), dict(dora_wd=True, wd_on_output=True)], ids=["locon", "dora"])
def test_kohya_peft_kohya_is_bit_exact(tmp_path, case):
    src = lycoris_file(tmp_path / "src.safetensors", seed=5, dtype=torch.float16, **case)
    convert(src, tmp_path / "k1.safetensors", "kohya")  # lycoris_ names -> lora_unet_
    convert(tmp_path / "k1.safetensors", tmp_path / "peft", "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] and cfg["use_dora"] == bool(case)  # conv α 1 vs linear α 2
    convert(tmp_path / "peft", tmp_path / "k2.safetensors", "kohya")
    raw = load_file(src)
    want = {"lora_unet_" + k[len("lycoris_"):]: v for k, v in raw.items()}
    _same_bytes(load_file(str(tmp_path / "k1.safetensors")), want)
    _same_bytes(load_file(str(tmp_path / "k2.safetensors")), want)


def test_multi_component_round_trip(tmp_path):
    """UNet + text encoder, kohya names: PEFT sub-folders and a diffusers file, both back to the same bytes."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    unet, te = tiny_unet(), tiny_clip()
    mods = [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (32, 32)),
            ("lora_unet_down_blocks_0_resnets_0_conv1", (32, 32, 3, 3)),
            ("lora_unet_mid_block_attentions_0_proj_in", (64, 64, 1, 1)),
            ("lora_te_text_model_encoder_layers_1_mlp_fc1", (64, 32)),
            ("lora_te_text_model_encoder_layers_0_self_attn_out_proj", (32, 32))]
    for i, (name, shape) in enumerate(mods):
        r = 2 + i
        sd[f"{name}.lora_down.weight"] = torch.randn(r, *shape[1:], generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g)
        sd[f"{name}.alpha"] = torch.tensor(float(i) + 0.5)
    save_file(sd, str(tmp_path / "k.safetensors"))
    convert(tmp_path / "k.safetensors", tmp_path / "peft", "peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["text_encoder", "unet"]
    convert(tmp_path / "peft", tmp_path / "back.safetensors", "kohya")
    _same_bytes(load_file(str(tmp_path / "back.safetensors")), sd)
    convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers")
    assert any(k.startswith("text_encoder.text_model.") for k in load_file(str(tmp_path / "d.safetensors")))
    convert(tmp_path / "d.safetensors", tmp_path / "back2.safetensors", "kohya")
    _same_bytes(load_file(str(tmp_path / "back2.safetensors")), sd)
    del unet, te


@pytest.mark.parametrize("case", [dict(), dict(dora_wd=True, wd_on_output=True)], ids=["locon", "dora"])
def test_peft_output_loads_in_peft(tmp_path, case):
    from peft import PeftModel

    src = lycoris_file(tmp_path / "src.safetensors", seed=6, **case)
    convert(src, tmp_path / "peft", "peft")
    pm = PeftModel.from_pretrained(tiny_unet(seed=0), str(tmp_path / "peft")).eval()
    ours = tiny_unet(seed=0)
    plan = _ours(ours, src)
    assert len(plan.targets) > 50
    inp = _unet_input(ours)
    with torch.no_grad():
        want = pm(*inp).sample
        got = ours(*inp).sample
        base = tiny_unet(seed=0)(*inp).sample
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_diffusers_output_loads_in_diffusers(tmp_path):
    src = lycoris_file(tmp_path / "src.safetensors", seed=7)
    convert(src, tmp_path / "lora.safetensors", "diffusers")
    theirs = tiny_unet(seed=0)
    theirs.load_lora_adapter(str(tmp_path), weight_name="lora.safetensors", prefix="unet", adapter_name="x")
    ours = tiny_unet(seed=0)
    _ours(ours, src)
    inp = _unet_input(ours, 1)
    with torch.no_grad():
        want, got, base = theirs(*inp).sample, ours(*inp).sample, tiny_unet(seed=0)(*inp).sample
    assert (want - base).abs().max() > 1e-2  # diffusers really applied it
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_text_encoder_peft_with_reference_model(tmp_path):
    """transformers>=5 CLIPTextModel has no ``text_model`` level: the reference model gives the paths."""
    from peft import PeftModel

    te = tiny_clip()
    g = torch.Generator().manual_seed(4)
    sd = {}
    for i in range(2):
        for proj in ("self_attn_q_proj", "mlp_fc2"):
            name = f"lora_te_text_model_encoder_layers_{i}_{proj}"
            o, n = (32, 64) if proj == "mlp_fc2" else (32, 32)
            sd[f"{name}.lora_down.weight"] = torch.randn(3, n, generator=g)
            sd[f"{name}.lora_up.weight"] = torch.randn(o, 3, generator=g)
            sd[f"{name}.alpha"] = torch.tensor(1.5)
    save_file(sd, str(tmp_path / "te.safetensors"))
    ref = {"text_encoder." + k: tuple(v.shape) for k, v in te.state_dict().items()}
    convert(tmp_path / "te.safetensors", tmp_path / "peft", "peft", reference=ref)
    pm = PeftModel.from_pretrained(tiny_clip(), str(tmp_path / "peft")).eval()
    ours = tiny_clip()
    _ours(ours, tmp_path / "te.safetensors")
    ids = torch.randint(0, 100, (2, 7), generator=g)
    with torch.no_grad():
        want, got, base = pm(ids).last_hidden_state, ours(ids).last_hidden_state, te(ids).last_hidden_state
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_lycoris_modules_pass_through_to_kohya_and_refuse_peft(tmp_path):
    src = lycoris_file(tmp_path / "loha.safetensors", seed=8, algo="loha")
    res = convert(src, tmp_path / "k.safetensors", "kohya")
    assert res.kept_as_is == res.modules > 50
    _same_bytes(load_file(str(tmp_path / "k.safetensors")),
                {"lora_unet_" + k[len("lycoris_"):]: v for k, v in load_file(src).items()})
    with pytest.raises(ToolError, match="no PEFT"):
        convert(src, tmp_path / "p", "peft")
    assert not (tmp_path / "p").exists()


def test_dotted_name_rule():
    assert dotted_name("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj") == \
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj")
    assert dotted_name("lora_te2_text_model_encoder_layers_3_self_attn_out_proj") == \
        ("text_encoder_2", "text_model.encoder.layers.3.self_attn.out_proj")
    assert dotted_name("lora_unet_up_blocks_0_resnets_2_time_emb_proj") == ("unet", "up_blocks.0.resnets.2.time_emb_proj")
