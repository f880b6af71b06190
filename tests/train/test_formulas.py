"""Formulas against independent computations: LR schedules (diffusers' get_scheduler), min-SNR weights,
v-prediction target, buckets (sd-scripts' rule), caption processing, the LoRA side path."""
from __future__ import annotations

import math
import random

import pytest
import torch

from lora_engine.train.buckets import make_buckets, nearest_bucket
from lora_engine.train.captions import CaptionOptions, process_caption, tag_frequency
from lora_engine.train.network import LoraHook, NetworkConfig
from lora_engine.train.schedule import loss_weights, lr_factor, noisy_inputs


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts"])
def test_lr_schedules_match_diffusers(name):
    from diffusers.optimization import get_scheduler

    total, warmup = 40, 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    extra = {"num_cycles": 3} if name == "cosine_with_restarts" else {}
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, **extra)
    for step in range(total):
        want = opt.param_groups[0]["lr"]
        assert math.isclose(lr_factor(name, step, total, warmup, extra.get("num_cycles", 1)), want, abs_tol=1e-12)
        opt.step()
        sched.step()


def test_min_snr_and_v_target_against_direct_formulas():
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ac = s.alphas_cumprod
    t = torch.tensor([0, 10, 300, 999])
    for gamma in (1.0, 5.0):
        for kind in ("epsilon", "v_prediction"):
            got = loss_weights(t, ac, gamma, kind)
            for i, ti in enumerate(t.tolist()):
                a = float(ac[ti])
                snr = a / (1 - a)
                want = min(snr, gamma) / (snr if kind == "epsilon" else snr + 1)
                assert math.isclose(float(got[i]), want, rel_tol=1e-5)
    x0, eps = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    noisy, target = noisy_inputs(x0, eps, t, ac, "v_prediction")
    torch.testing.assert_close(noisy, s.add_noise(x0, eps, t))  # diffusers' own forward process
    torch.testing.assert_close(target, s.get_velocity(x0, eps, t))


def test_buckets_follow_sd_scripts_rule():
    b = make_buckets(512, 64, 256, 1024)
    assert (512, 512) in b and (768, 320) in b and (320, 768) in b and (1024, 256) in b
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in b)
    assert (576, 384) not in b and (576, 448) in b  # h = ⌊A / w / 64⌋ · 64
    assert nearest_bucket((1200, 800), b) == (640, 384)  # |log 1.667 − log 1.5| < |log 1.286 − log 1.5|
    assert nearest_bucket((1000, 1000), b) == (512, 512)


def test_caption_processing_keeps_tokens_and_is_seeded():
    cap = "sks, red, square, blue, background"
    opts = CaptionOptions(shuffle=True, keep_tokens=1, tag_dropout=0.3)
    outs = {process_caption(cap, opts, random.Random(i), 0) for i in range(30)}
    assert all(o.startswith("sks") for o in outs) and len(outs) > 5
    assert process_caption(cap, opts, random.Random(3), 0) == process_caption(cap, opts, random.Random(3), 0)
    assert process_caption(cap, CaptionOptions(dropout_every_n_epochs=2), random.Random(0), 4) == ""
    assert process_caption(cap, CaptionOptions(), random.Random(0), 1) == cap
    assert tag_frequency({"a": ["X, y", "x"]}) == {"a": {"x": 2, "y": 1}}


def test_lora_side_path_is_kohya_math():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
    hook = LoraHook("n", conv, 3, 1.5, NetworkConfig())
    torch.nn.init.normal_(hook.up)
    hook.eval()
    hook.attach()
    x = torch.randn(2, 6, 8, 8)
    got = conv(x)
    hook.detach()
    dw = (hook.up.reshape(5, 3) @ hook.down.reshape(3, -1)).reshape(5, 6, 3, 3) * (1.5 / 3)
    want = torch.nn.functional.conv2d(x, conv.weight + dw, conv.bias, 2, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, 2, 1))


def test_openclip_style_text_encoder_skips_fused_attention():
    """OpenCLIP blocks (A1111 SD2): MLP linears are trained; MultiheadAttention's out_proj is not (never called)."""
    from lora_engine.train.network import _selected

    block = torch.nn.Module()
    block.attn = torch.nn.MultiheadAttention(8, 2)
    block.mlp = torch.nn.Sequential()
    block.mlp.add_module("c_fc", torch.nn.Linear(8, 16))
    root = torch.nn.Module()
    root.blk = block
    classes = {p: ("ResidualAttentionBlock" if p == "blk" else type(m).__name__) for p, m in root.named_modules()}
    cfg = NetworkConfig(rank=3, train_text_encoder=True)
    assert _selected("blk.mlp.c_fc", block.mlp.c_fc, [], "te", cfg, classes) == 3
    assert _selected("blk.attn.out_proj", block.attn.out_proj, [], "te", cfg, classes) is None
