"""Intended numeric differences from ComfyUI's own LoraLoader, each shown on real tensors.

ComfyUI's formulas below are restated from its behaviour as docs/adapter-formulas.md describes it
(ComfyUI ``comfy/lora.py`` ``calculate_weight``, ``comfy/weight_adapter/``), not copied from its code:
(1) on most GPUs it adds ΔW in fp16 (``W16 + fp16(s·ΔW)``), we add in fp32 and round once; (2) output-axis
DoRA divides by the row norms of the original W, we (as PEFT and LyCORIS) by those of W + ΔW; (3) OFT
strength enters squared there, linearly here.
"""
from __future__ import annotations

import torch

from comfy_nodes.apply import keymap_for
from comfy_nodes.loading import CACHE
from comfy_nodes.patches import build_patches
from lora_engine.patch import StackEntry
from tests.fixtures.files.comfy import kohya_lora, lycoris_file
from tests.hosts.comfy.standin import calculate_weight


def _one_patch(sd1, path, key_part: str, te=1.0, unet=1.0):
    model, clip, _ = sd1
    ps = build_patches([StackEntry(CACHE.get(path), te=te, unet=unet)], keymap_for(model, clip))
    key = next(k for k in ps.model if isinstance(k, str) and key_part in k)
    return key, ps.model[key], model.model_state_dict()[key].detach().clone()


def test_fp16_working_copy_rounds_once(loras, sd1):
    _, _, m = sd1
    kohya_lora(loras / "k.safetensors", m, alpha=4.0)
    key, patch, w = _one_patch(sd1, loras / "k.safetensors", "attn1.to_q")
    w16 = w.half()
    ours = calculate_weight([(1.0, patch, 1.0, None, None)], w16.clone(), key, intermediate_dtype=torch.float16)
    dw = patch.delta(w16.float())
    exact = w16.float() + dw
    assert torch.equal(ours, exact.half())  # one rounding of the fp32 sum: what the engine's merge gives
    comfy_gpu = w16 + dw.half()  # ComfyUI on GPU since Dec 2025: ΔW rounded to fp16, then an fp16 add
    assert (ours.float() - exact).abs().max() <= (comfy_gpu.float() - exact).abs().max()
    assert not torch.equal(ours, comfy_gpu)  # they differ by an fp16 ulp in places


def test_output_axis_dora_renormalises_merged_weight(loras, sd1):
    _, _, m = sd1
    lycoris_file(loras / "d.safetensors", m, "dora")
    key, patch, w = _one_patch(sd1, loras / "d.safetensors", "attn1.to_k")
    lf = CACHE.get(loras / "d.safetensors")
    dora = next(c.adapter for c in patch.contributions)
    assert dora.kind == "dora" and dora.magnitude.shape[0] == w.shape[0]  # output axis
    ours = calculate_weight([(1.0, patch, 1.0, None, None)], w.clone(), key)
    mag = dora.magnitude.float().reshape(-1)
    torch.testing.assert_close(ours.norm(dim=1), mag, rtol=1e-5, atol=1e-6)  # ‖W'_row‖ = m: DoRA's definition
    wc = w + dora.inner.delta(w).weight
    comfy = wc * (mag.reshape(-1, 1) / (w.norm(dim=1, keepdim=True) + torch.finfo(w.dtype).eps))
    assert (comfy.norm(dim=1) - mag).abs().max() > 1e-3  # ComfyUI's ‖W‖ normalisation misses m
    assert len(lf.modules) > 0


def test_oft_strength_is_linear(loras, sd1):
    _, _, m = sd1
    lycoris_file(loras / "o.safetensors", m, "oft")
    key, patch, w = _one_patch(sd1, loras / "o.safetensors", "attn1.to_q")
    full = calculate_weight([(1.0, patch, 1.0, None, None)], w.clone(), key) - w
    half = calculate_weight([(0.5, patch, 1.0, None, None)], w.clone(), key) - w
    torch.testing.assert_close(half, 0.5 * full, rtol=1e-5, atol=1e-7)  # ours: W + s·ΔW
    assert full.abs().max() > 1e-3
    # ComfyUI: net change s²·ΔW, i.e. 0.25·ΔW at s = 0.5 (documented there as verified)
    assert (half - 0.25 * full).abs().max() > 0.2 * full.abs().max()
