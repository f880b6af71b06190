"""Outputs of whole generations driven through A1111's call order (standin.process_images):
on the fly equals merged; per-image LoRAs in one batch equal separate runs; start=/stop= switch at
the right steps without touching weights (on the fly) or re-merging only what switches (merged);
negative-prompt tags act on the uncond half only; stale conds are never reused."""
from __future__ import annotations

import functools

import pytest
import torch

from extension.steps import on_cfg_denoiser
from lora_engine.engine import LoraEngine, Mode, shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from tests.hosts.a1111.conftest import make_network
from tests.hosts.a1111.standin import Processing, SdConditioning, parse_prompts, process_images


@pytest.fixture(autouse=True)
def fresh_cond_cache():
    Processing.cached_c, Processing.cached_uc = [None, None], [None, None]


def generate(sd_model, folder, prompts, negatives, batch_size, steps=4, **opts):
    c, net = make_network(folder, **opts)
    p = Processing(sd_model, prompts, negatives, batch_size, steps)
    out = process_images(p, {"lora": net}, {"lyco": net}, [functools.partial(on_cfg_denoiser, c)])
    mode = c.runtime.engine.mode
    c.runtime.clear()  # one controller per process in A1111; here each call has its own
    return out, p, mode


@torch.no_grad()
def reference(sd_model, folder, prompt, negative, stack_at, steps, seed):
    """One image, outside the extension: a merged engine switched per half-batch and per step.
    ``stack_at(step, uncond)`` -> [(file stem, te, unet)]; the text encoder uses step -1."""
    eng = LoraEngine(sd_model, build_keymap(shapes_of(sd_model)), Mode.MERGED)

    def put(spec):
        eng.set_stack([StackEntry(load_lora(str(folder / f"{n}.safetensors")), te=te, unet=u, key=n)
                       for n, te, u in spec])

    put(stack_at(-1, True))
    uc = sd_model.get_learned_conditioning(SdConditioning([negative], True))
    put(stack_at(-1, False))
    c = sd_model.get_learned_conditioning(SdConditioning(parse_prompts([prompt])[0]))  # A1111's tag removal
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    unet = sd_model.model.diffusion_model
    for step in range(steps):
        t = torch.full((1,), float(steps - step))
        put(stack_at(step, False))
        cond = unet(x, t, c)
        put(stack_at(step, True))
        uncond = unet(x, t, uc)
        x = x - 0.05 * (uncond + 5.0 * (cond - uncond))
    eng.restore()
    return x


def test_onthefly_equals_merged(sd_model, loras):
    folder, _ = loras
    prompts = ["a <lora:a:0.8> <lora:b:-0.6:1.1>"] * 2
    merged, _, _ = generate(sd_model, folder, prompts, ["bad"] * 2, 2, lora_engine_mode="merged")
    fly, _, mode = generate(sd_model, folder, prompts, ["bad"] * 2, 2, lora_engine_mode="on the fly")
    plain, _, _ = generate(sd_model, folder, ["a"] * 2, ["bad"] * 2, 2)
    assert mode is Mode.ONTHEFLY
    assert (merged - plain).abs().max() > 1e-2  # the LoRAs do something
    torch.testing.assert_close(fly, merged, rtol=0, atol=1e-4)
    ref = reference(sd_model, folder, prompts[0], "bad", lambda s, u: [("a", 0.8, 0.8), ("b", -0.6, 1.1)], 4, 0)
    torch.testing.assert_close(merged[:1], ref, rtol=0, atol=1e-5)


def test_per_image_loras_in_one_batch_equal_separate_runs(sd_model, loras):
    folder, _ = loras
    prompts = ["cat <lora:a:1>", "dog <lora:b:0.7>", "cow", "cat <lora:a:1> <lora:b:-1>"]
    negs = ["bad", "poor <lora:a:0.5>", "ugly", "worse"]
    one, p, mode = generate(sd_model, folder, prompts, negs, batch_size=4)
    assert mode is Mode.ONTHEFLY and not p.comments  # automatic: per-image stacks need factors
    apart, _, _ = generate(sd_model, folder, prompts, negs, batch_size=1)
    torch.testing.assert_close(one, apart, rtol=0, atol=1e-4)
    ref = reference(sd_model, folder, prompts[1], "poor",
                    lambda s, u: [("b", 0.7, 0.7)] + ([("a", 0.5, 0.5)] if u else []), 4, 1)
    torch.testing.assert_close(one[1:2], ref, rtol=0, atol=1e-4)


def test_same_text_with_different_te_loras_gets_each_images_conds(sd_model, loras):
    """A1111 encodes each distinct prompt text once per batch; images with the same text but other
    text-encoder LoRAs (here also in the negative prompt) still get their own conds."""
    folder, _ = loras
    prompts = ["cat <lora:a:1>", "cat <lora:b:1>", "cat <lora:a:1>", "cat"]
    negs = ["bad", "bad <lora:b:0.5>", "bad", "bad"]
    one, p, _ = generate(sd_model, folder, prompts, negs, batch_size=4)
    apart, _, _ = generate(sd_model, folder, prompts, negs, batch_size=1)
    torch.testing.assert_close(one, apart, rtol=0, atol=1e-4)
    assert not any("share the" in c for c in p.comments), p.comments
    assert p.prompts == ["cat ", " cat ", "cat ", "cat"] and p.negative_prompts == ["bad", " bad", "bad", "  bad"]


@pytest.mark.parametrize("mode", ["on the fly", "merged"])
def test_step_schedule(sd_model, loras, mode):
    folder, _ = loras
    c, net = make_network(folder, lora_engine_mode=mode)
    p = Processing(sd_model, ["x <lora:a:1:start=3:stop=5>"], ["bad"], 1, steps=6)
    params = dict(sd_model.state_dict(keep_vars=False))
    seen = []

    def watch(prm):
        st = c.runtime.engine.stats
        seen.append((prm.sampling_step, id(st), getattr(st, "slots_written", 0), getattr(st, "slots_restored", 0)))
        if mode == "on the fly":
            assert all(torch.equal(v, params[k]) for k, v in sd_model.state_dict().items())

    out = process_images(p, {"lora": net}, {}, [functools.partial(on_cfg_denoiser, c), watch])
    c.runtime.clear()
    on = lambda s: 2 <= s < 4  # noqa: E731 - 1-based steps 3 and 4
    ref = reference(sd_model, folder, p.all_prompts[0], "bad", lambda s, u: [("a", 1.0, 1.0 if (s < 0 or on(s)) else 0.0)], 6, 0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    if mode == "merged":  # the 4 UNet modules of `a` are written at step index 2 and restored at 4, nothing else
        work = [(s, w, r) for i, (s, sid, w, r) in enumerate(seen) if (i == 0 or sid != seen[i - 1][1]) and (w or r)]
        assert work == [(2, 4, 0), (4, 0, 4)], seen


def test_negative_prompt_tags(sd_model, loras):
    folder, _ = loras
    out, p, _ = generate(sd_model, folder, ["a house"], ["<lora:b:1> blurry"], 1)
    assert p.negative_prompts == ["blurry"]
    ref = reference(sd_model, folder, "a house", "blurry", lambda s, u: [("b", 1.0, 1.0)] if u else [], 4, 0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_cond_cache_cleared_when_other_images_tags_change(sd_model, loras):
    folder, _ = loras
    c, net = make_network(folder)
    hooks = [functools.partial(on_cfg_denoiser, c)]
    p1 = Processing(sd_model, ["x", "y <lora:a:1>"], ["bad", "poor"], 2)
    process_images(p1, {"lora": net}, {}, hooks)
    p2 = Processing(sd_model, ["x", "y <lora:b:1>"], ["bad", "poor"], 2)  # A1111's key: same prompts, same first-prompt data
    second = process_images(p2, {"lora": net}, {}, hooks)
    c.runtime.clear()
    Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
    fresh, _, _ = generate(sd_model, folder, ["x", "y <lora:b:1>"], ["bad", "poor"], 2)
    torch.testing.assert_close(second, fresh, rtol=0, atol=1e-6)


def test_hires_pass_uses_its_own_stack(sd_model, loras):
    folder, _ = loras
    c, net = make_network(folder)
    p = Processing(sd_model, ["x <lora:a:1>"], ["bad"], 1, steps=2, hr_prompts=["x <lora:b:0.5>"])
    process_images(p, {"lora": net}, {}, [functools.partial(on_cfg_denoiser, c)], hires_steps=2)
    assert [v.mentioned for v in c.runtime.batch.variants] == ["b"]
    assert p.extra_generation_params["Lora hashes"].startswith("a: ") and ", b: " in p.extra_generation_params["Lora hashes"]


def test_backups_setting_moves_them_and_changing_it_restores_first(sd_model, loras):
    """Backups in "GPU memory" = the engine's ``same`` device; switching the setting between generations
    puts the weights back bit for bit before the engine is rebuilt with the new place."""
    folder, _ = loras
    before = {k: v.detach().clone() for k, v in sd_model.state_dict().items()}
    c, net = make_network(folder, lora_engine_mode="merged")
    p = Processing(sd_model, ["<lora:a:0.8> x"], [""], 1, 2)
    process_images(p, {"lora": net}, {"lyco": net}, [functools.partial(on_cfg_denoiser, c)])
    first = c.runtime
    assert first.engine.backup_device == "cpu" and first.engine.plan.contributions
    c.opts.values["lora_engine_backups"] = "GPU memory"
    rt = c.runtime_for(sd_model)
    assert rt is not first and rt.engine.backup_device == "same"
    assert not first.engine.plan.contributions  # the old engine restored before it was let go
    for k, v in sd_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    p = Processing(sd_model, ["<lora:a:0.8> x"], [""], 1, 2)
    process_images(p, {"lora": net}, {"lyco": net}, [functools.partial(on_cfg_denoiser, c)])
    assert c.runtime is rt and rt.engine.plan.contributions and rt.engine._patcher.backups
    rt.clear()
    for k, v in sd_model.state_dict().items():
        assert torch.equal(v, before[k]), k
