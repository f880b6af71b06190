"""LoRA overhead per generation in the A1111 glue: text encode + N UNet steps on an SD1.5-shaped,
ldm-named model (A1111's ``model.diffusion_model`` / ``cond_stage_model.wrapped.transformer`` names),
driven through the same call order as A1111 (tests/hosts/a1111/standin.py: activate per batch,
cfg-denoiser callback per step).

Overhead = best time per generation with LoRAs - best time without, same process, same machine
(best of several: the CPUs are shared, so the minimum is the least disturbed measurement).
The time spent inside the extra network's ``activate`` (parse, resolve, patch) is reported
separately: it is the part of the overhead that does not drown in machine noise. A1111's cond
cache is emptied before every generation, so every case (baseline included) encodes its prompt:
the "changing" prompts would miss that cache in A1111 anyway.
Cases: a static stack (the same two LoRAs every generation) and a stack that changes every
generation (the weights alternate), each in merged and on-the-fly mode.

    python bench/bench_a1111.py [--full] [--gens 3] [--steps 4] [--latent 16]

Default size is reduced (SD1.5 layout and depth, channels /5, CLIP width 384) so it fits a 2-CPU
machine; ``--full`` uses the SD1.5 UNet config (320..1280 channels, 768-wide 12-layer CLIP).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from extension.steps import on_cfg_denoiser  # noqa: E402
from tests.hosts.a1111.conftest import make_network, write_lora  # noqa: E402
from tests.hosts.a1111.standin import Processing, SDModel, process_images  # noqa: E402
from tests.fixtures.models.tiny_sd import TinySD  # noqa: E402


def sd15_like(full: bool):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ch = (320, 640, 1280, 1280) if full else (64, 128, 256, 256)
    width = 768 if full else 384
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=ch,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=32).eval()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=4 * width,
                                      num_hidden_layers=12, num_attention_heads=12 if full else 6,
                                      max_position_embeddings=77)).eval()
    return TinySD("sd1", unet, [te])


def lora_modules(model) -> dict[str, str]:
    """Attention projections of the UNet and the CLIP (what most kohya LoRAs train)."""
    out = {}
    for path, m in model.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and any(path.endswith(s) for s in ("to_q", "to_k", "to_v", "to_out.0")):
            out["lora_unet_" + path.replace(".", "_")] = "unet." + path
    for path, m in model.text_encoders[0].named_modules():
        if isinstance(m, torch.nn.Linear) and "self_attn" in path:
            out["lora_te_text_model_" + path.replace(".", "_")] = "te." + path
    return out


def run(sd_model, folder, prompts_per_gen, mode, steps, latent):
    c, net = make_network(folder, lora_engine_mode=mode)
    times, applied = [], []
    activate = net.activate

    def timed_activate(p, params_list):
        t = time.perf_counter()
        activate(p, params_list)
        applied[-1] += time.perf_counter() - t

    net.activate = timed_activate
    for prompt in prompts_per_gen:
        p = Processing(sd_model, [prompt], ["bad"], 1, steps)
        Processing.cached_c, Processing.cached_uc = [None, None], [None, None]  # every case encodes its text
        applied.append(0.0)
        t0 = time.perf_counter()
        process_images(p, {"lora": net}, {"lyco": net}, [functools.partial(on_cfg_denoiser, c)], latent=latent)
        times.append(time.perf_counter() - t0)
    if c.runtime is not None:
        c.runtime.clear()
    return times[1:], applied[1:]  # the first generation also loads files and builds the key map


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--gens", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core box: more oversubscribes)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = sd15_like(a.full)
    sd_model = SDModel(model)
    lat = a.latent
    folder = Path(tempfile.mkdtemp())
    mods = lora_modules(model)
    write_lora(folder / "style.safetensors", model, mods, 1, rank=16, alpha=8)
    write_lora(folder / "char.safetensors", model, mods, 2, rank=16, alpha=8)
    n = a.gens + 1
    cases = {
        "none": ["a photo"] * n,
        "static": ["a photo <lora:style:0.8> <lora:char:0.6>"] * n,
        "changing": [f"a photo <lora:style:{0.5 + 0.1 * (i % 2)}> <lora:char:0.6>" for i in range(n)],
    }
    keys = [("none", "merged")] + [(c, m) for c in ("static", "changing") for m in ("merged", "on the fly")]
    best = {k: float("inf") for k in keys}
    act = {k: float("inf") for k in keys}
    for _ in range(a.sweeps):  # the machine is shared: best of all timed generations over several sweeps
        for case, mode in keys:
            t, ap_t = run(sd_model, folder, cases[case], mode, a.steps, lat)
            best[case, mode], act[case, mode] = min(best[case, mode], min(t)), min(act[case, mode], min(ap_t))
    base = best["none", "merged"]
    rows = [(c, m, best[c, m], best[c, m] - base, act[c, m]) for c, m in keys[1:]]
    size = "SD1.5 full config" if a.full else "SD1.5 layout, channels 64-256, CLIP 12x384"
    print(f"model: {size}; latent {lat}x{lat}; {a.steps} steps, batch 1, CFG; {len(mods)} LoRA modules x 2 LoRAs "
          f"(rank 16); best of {a.gens} timed generations x {a.sweeps} sweeps; {torch.get_num_threads()} threads")
    print(f"baseline (no LoRA): {base * 1000:.0f} ms/generation")
    print(f"activate() without LoRAs: {act['none', 'merged'] * 1000:.1f} ms")
    print(f"{'stack':<10} {'mode':<11} {'ms/gen':>8} {'overhead ms':>12} {'overhead %':>11} {'activate ms':>12}")
    for case, mode, t, d, ap_t in rows:
        print(f"{case:<10} {mode:<11} {t * 1000:>8.0f} {d * 1000:>12.0f} {100 * d / base:>10.1f}% {ap_t * 1000:>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
