"""lora-block-weight: block tables, presets, R/U/X, elemental directives, and the per-module
multiplier on real module names of tiny diffusers UNets (SD1- and SDXL-shaped)."""
from __future__ import annotations

import random

import pytest
import torch

from lora_engine.syntax.blocks import (BLOCK_IDS_26, DEFAULT_PRESETS, BlockRatios, block_ratios, module_block,
                                parse_directives, parse_presets, parse_vector)
from lora_engine.syntax.prompt import parse_prompt
from tests.fixtures.models.ldm_view import ldm_unet_view


def tag(text):
    p = parse_prompt(text)
    assert len(p.tags) == 1, p.warnings
    return p.tags[0]


@pytest.mark.parametrize("n, named", [
    (17, ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]),
    (12, ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]),
    (20, ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]),
    (26, list(BLOCK_IDS_26)),
])
def test_vectors_fill_named_slots_and_zero_the_rest(n, named):
    vals = [str(i + 1) for i in range(n)]  # distinct values so each slot is traceable
    r = dict(zip(BLOCK_IDS_26, parse_vector(",".join(vals)).resolve()))
    assert [r[b] for b in named] == [float(v) for v in vals]
    assert all(r[b] == 0.0 for b in BLOCK_IDS_26 if b not in named)


def test_default_presets_match_lbw_table():
    on = {  # blocks at 1, from the preset table of LBW's README (its default lbwpresets.txt)
        "INS": {"BASE", "IN01", "IN02", "IN04"}, "IND": {"BASE", "IN05", "IN07", "IN08"},
        "INALL": {"BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"},
        "MIDD": {"BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"},
        "OUTD": {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"},
        "OUTS": {"BASE"} | {f"OUT{i:02d}" for i in range(7, 12)},
        "OUTALL": {"BASE"} | {f"OUT{i:02d}" for i in range(3, 12)},
    }
    for preset, blocks in on.items():
        r = dict(zip(BLOCK_IDS_26, tag(f"<lora:a:lbw={preset}>").lbw.resolve()))
        assert {b for b, v in r.items() if v == 1.0} == blocks, preset
        assert all(v in (0.0, 1.0) for v in r.values())
    assert set(tag("<lora:a:lbw=ALL0.5>").lbw.resolve()) == {0.5, 0.0}
    assert set(DEFAULT_PRESETS) >= {"NONE", "ALL", "ALL0.5"}


def test_preset_file_rules():
    text = "# comment:1,1,1,1,1,1,1,1,1,1,1,1\nA:1,1,1,1,1,1,1,1,1,1,1,1\nBAD:1,2\nnocolon\nB: 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\n"
    assert set(parse_presets(text)) == {"A", "B"}


def test_random_and_inherited_values():
    t = tag("<lora:a:lbw=R,U,X,X+0.5,X-0.25,1,1,1,1,1,1,1:x=0.3>")
    r = t.lbw.resolve(t.x, random.Random(0))
    rr, ru = r[0], r[BLOCK_IDS_26.index("IN04")]
    assert 0 <= rr <= 1 and round(rr, 3) == rr and -0.5 <= ru <= 1.5 and round(ru, 3) == ru
    assert r[BLOCK_IDS_26.index("IN05")] == 0.3
    assert r[BLOCK_IDS_26.index("IN07")] == pytest.approx(0.8)
    assert r[BLOCK_IDS_26.index("IN08")] == pytest.approx(0.05)
    assert tag("<lora:a:lbw=R,U,X,X+0.5,X-0.25,1,1,1,1,1,1,1>").lbw.resolve(1.0, random.Random(0))[6] == 1.0  # X defaults to 1
    # the draw happens once per hook, from the given rng
    assert block_ratios(t, random.Random(7)).ratios == block_ratios(t, random.Random(7)).ratios


@pytest.mark.parametrize("name, block", [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "BASE"),
    ("lora_te2_text_model_encoder_layers_3_mlp_fc1", "BASE"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "IN04"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "IN01"),
    ("lora_unet_input_blocks_10_0_out_layers_3", "IN10"),
    ("lora_unet_middle_block_1_proj_in", "M00"),
    ("lora_unet_output_blocks_11_1_proj_out", "OUT11"),
    ("lora_unet_output_blocks_1_0_skip_connection", "OUT01"),
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k", "IN05"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "IN03"),
    ("lora_unet_mid_block_attentions_0_proj_in", "M00"),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "OUT11"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "OUT02"),
    ("lora_unet_conv_in", "IN00"),
    ("lora_unet_time_embedding_linear_1", None),
    ("lora_unet_conv_out", None),
    ("lora_unet_time_embed_0", None),
])
def test_module_blocks(name, block):
    assert module_block(name)[0] == block


def _expected_blocks(unet) -> dict[str, str]:
    """Independent of the closed form in blocks.py: walk the real model in ldm order
    (conv_in = IN00; each resnet(+attention) pair and each downsampler is one input block;
    each up layer is one output block, the upsampler joins the last one of its up block)."""
    out = {"conv_in": "IN00"}
    n = 1
    for i, down in enumerate(unet.down_blocks):
        for j in range(len(down.resnets)):
            out[f"down_blocks.{i}.resnets.{j}"] = f"IN{n:02d}"
            if getattr(down, "attentions", None):
                out[f"down_blocks.{i}.attentions.{j}"] = f"IN{n:02d}"
            n += 1
        if down.downsamplers:
            out[f"down_blocks.{i}.downsamplers.0"] = f"IN{n:02d}"
            n += 1
    out["mid_block"] = "M00"
    n = 0
    for i, up in enumerate(unet.up_blocks):
        for j in range(len(up.resnets)):
            out[f"up_blocks.{i}.resnets.{j}"] = f"OUT{n:02d}"
            if getattr(up, "attentions", None):
                out[f"up_blocks.{i}.attentions.{j}"] = f"OUT{n:02d}"
            if j == len(up.resnets) - 1 and up.upsamplers:
                out[f"up_blocks.{i}.upsamplers.0"] = f"OUT{n:02d}"
            n += 1
    return out


SD1 = dict(block_out_channels=(8, 8, 16, 16), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL = dict(block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 2))


@pytest.mark.parametrize("cfg, attn_blocks", [
    (SD1, {"IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"} | {f"OUT{i:02d}" for i in range(3, 12)}),
    (SDXL, {"IN04", "IN05", "IN07", "IN08", "M00"} | {f"OUT{i:02d}" for i in range(6)}),
])
def test_block_of_every_module_of_a_real_unet(cfg, attn_blocks):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2, **cfg)
    expected = _expected_blocks(unet)
    seen_attn = set()
    for dotted, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        want = next((b for prefix, b in expected.items() if dotted == prefix or dotted.startswith(prefix + ".")), None)
        got = module_block("lora_unet_" + dotted.replace(".", "_"))[0]
        assert got == want, dotted
        if ".attentions." in dotted or dotted.startswith("mid_block.attentions"):
            seen_attn.add(got)
    assert seen_attn == attn_blocks  # exactly the blocks the 17 (SD1) / 12 (SDXL) vectors name, minus BASE


@pytest.mark.parametrize("cfg", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_ldm_names_match_the_ldm_view_of_the_same_model(cfg):
    """Element directives match ldm names; the ldm view (checked against diffusers' converter in
    tests/models) shares its leaf modules with the diffusers model, so each module has both names."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2, **cfg)
    ldm_of = {id(m): n for n, m in ldm_unet_view(unet).named_modules()}
    checked = 0
    for dotted, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        block, key = module_block("lora_unet_" + dotted.replace(".", "_"))
        want = "diffusion_model_" + ldm_of[id(mod)].replace(".", "_")
        if dotted == "up_blocks.0.upsamplers.0.conv" and cfg is SDXL:
            assert key.replace("_1_conv", "_2_conv") == want   # the documented sub-index guess
        else:
            assert key == want, dotted
        checked += 1
    assert checked > 50


def test_multiplier_combines_te_unet_and_blocks():
    t = tag("<lora:a:0.5:2:lbw=MIDD>")
    ratio = block_ratios(t)

    def m(name):  # the plan's per-module strength: (te for text-encoder modules, else unet) x block ratio
        return (t.te if name.startswith("lora_te") else t.unet) * ratio(name)

    assert m("lora_te_text_model_encoder_layers_0_mlp_fc1") == 0.5 * 1    # BASE is 1 in MIDD
    assert m("lora_unet_down_blocks_1_attentions_1_proj_in") == 2 * 1     # IN05
    assert m("lora_unet_down_blocks_1_attentions_0_proj_in") == 2 * 0     # IN04
    assert m("lora_unet_time_embedding_linear_1") == 2 * 1                 # outside every block: 1
    assert m("lora_unet_conv_in") == 0                                      # IN00 is not named by a 17-vector
    assert block_ratios(tag("<lora:a:0.5:2>")) is None  # no block weights: the strengths alone


def test_elemental_directives():
    m = block_ratios(tag("<lora:a:1:lbw=ALL:lbwe=ATTNDEEPOFF>"))
    assert m("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q") == 0   # IN05 attn
    assert m("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == 1   # IN04: outside range
    assert m("lora_unet_down_blocks_1_attentions_1_proj_in") == 1                           # not attn
    assert m("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v") == 0     # OUT05: range end
    assert m("lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn2_to_v") == 1     # OUT06: after it
    assert m("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v") == m("lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_v")
    p = block_ratios(tag("<lora:a:lbwe=PROJDEEPOFF>"))
    assert p("lora_unet_mid_block_attentions_0_proj_out") == 0
    # resnet time_emb_proj is emb_layers in the ldm names LBW matches: "proj" does not hit it
    assert p("lora_unet_mid_block_resnets_0_time_emb_proj") == 1


def test_directive_grammar():
    d = parse_directives("NOT IN05 OUT01-OUT00:NOT attn ff:0.5")
    assert d[0].blocks_not and set(d[0].blocks) == {"IN05", "OUT00", "OUT01"} and d[0].elements_not
    assert d[0].matches("IN04", "proj_in") and not d[0].matches("IN05", "proj_in") and not d[0].matches("IN04", "attn1")
    last = BlockRatios(None, parse_directives("::0.2,IN04::0.7"))
    assert last("lora_unet_input_blocks_4_1_x") == 0.7 and last("lora_unet_input_blocks_5_1_x") == 0.2
    with pytest.raises(ValueError):
        parse_directives("IN99::1")
