"""Caching (a strength change reads no file), one warning line per LoRA for unmatched keys with the
core's diagnosis, and diffusers/PEFT files applied in full (ComfyUI skips their attention keys)."""
from __future__ import annotations

import os

import torch

import lora_engine.library.parsed
from comfy_nodes import loading
from comfy_nodes.loader import LoraEngineLoader, LoraEngineLoaderModelOnly
from tests.fixtures.files.comfy import diffusers_peft_lora, kohya_lora, lycoris_file
from tests.hosts.comfy.helpers import assert_equal_weights, engine_state, patched_state


def _count_loads(monkeypatch) -> list:
    calls = []
    real = lora_engine.library.parsed.load_lora

    def counting(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(lora_engine.library.parsed, "load_lora", counting)  # counts the cache's file reads
    return calls


def test_strength_change_reads_no_file(loras, sd1, monkeypatch):
    model, clip, m = sd1
    kohya_lora(loras / "k.safetensors", m)
    calls = _count_loads(monkeypatch)
    misses, hits = loading.CACHE.misses, loading.CACHE.hits
    a = LoraEngineLoader().load(model, clip, "k.safetensors", 1.0, 1.0)[0]
    b = LoraEngineLoader().load(model, clip, "k.safetensors", 0.3, -0.2)[0]
    assert len(calls) == 1 and loading.CACHE.misses - misses == 1 and loading.CACHE.hits - hits == 1
    assert not torch.equal(patched_state(a)[next(iter(a.patches))], patched_state(b)[next(iter(b.patches))])
    # a file re-saved under the same name is read again (and IS_CHANGED changes)
    sig = LoraEngineLoader.IS_CHANGED("k.safetensors")
    kohya_lora(loras / "k.safetensors", m, seed=9)
    st = os.stat(loras / "k.safetensors")
    os.utime(loras / "k.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    LoraEngineLoader().load(model, clip, "k.safetensors", 0.3, -0.2)
    assert len(calls) == 2 and LoraEngineLoader.IS_CHANGED("k.safetensors") != sig


def test_unmatched_keys_one_line_per_lora(loras, sd1, caplog):
    model, clip, m = sd1
    kohya_lora(loras / "k.safetensors", m)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(loras / "k.safetensors"))
    extra = {k.replace("lora_te_text_model_", "lora_te_text_model_extra_", 1): v.clone()
             for k, v in sd.items() if k.startswith("lora_te_")}  # names of no known family
    save_file(sd | extra, str(loras / "odd.safetensors"))
    new_model, new_clip = LoraEngineLoader().load(model, clip, "odd.safetensors", 1.0, 1.0)
    warns = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("lora_engine")]
    assert len(warns) == 1, warns
    n_extra = len({k.split(".")[0] for k in extra})
    assert "odd" in warns[0] and f"{n_extra} module(s) matched nothing" in warns[0]
    assert new_model.patches and new_clip.patcher.patches  # the rest still applies


def test_diffusers_peft_file_applies_every_key(loras, sd1, engine, caplog):
    model, clip, m = sd1
    n = diffusers_peft_lora(loras / "peft.safetensors", m)
    base = {k: v.clone() for k, v in model.model_state_dict().items()}
    new_model, new_clip = LoraEngineLoader().load(model, clip, "peft.safetensors", 0.9, 1.0)
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("lora_engine")]
    assert new_clip is clip
    attn = [k for k in new_model.patches if ".attn1." in k or ".attn2." in k]
    assert len(new_model.patches) == n and len(attn) == n  # every module is an attention projection, all applied
    ref = engine_state(engine, [(loras / "peft.safetensors", 1.0, 0.9)])
    assert assert_equal_weights(patched_state(new_model), ref, base) == n


def test_bias_deltas_patch_the_bias(loras, sd1, engine):
    """PEFT ``lora_B.bias``: the bias gets its own patch (Δb = s·bias) where the layer has a bias."""
    model, clip, m = sd1
    n = diffusers_peft_lora(loras / "b.safetensors", m, bias=True)
    base = {k: v.clone() for k, v in model.model_state_dict().items()}
    new_model, _ = LoraEngineLoader().load(model, clip, "b.safetensors", -0.5, 1.0)
    biases = [k for k in new_model.patches if k.endswith(".bias")]
    assert biases and all(".to_out.0." in k for k in biases)  # to_q/k/v have no bias in the UNet
    ref = engine_state(engine, [(loras / "b.safetensors", 1.0, -0.5)])
    assert assert_equal_weights(patched_state(new_model), ref, base) == n + len(biases)


def test_chained_loaders_join_into_one_stack(loras, sd1, engine):
    """Two chained loader nodes (ComfyUI's usual graph) give the engine's joint stack bit for bit, in either
    order, also for DoRA (not additive): the second node joins the first one's patch on each weight."""
    model, clip, m = sd1
    kohya_lora(loras / "a.safetensors", m, seed=1)
    lycoris_file(loras / "d.safetensors", m, "dora")
    base = {**{k: v.clone() for k, v in model.model_state_dict().items()},
            **{k: v.clone() for k, v in clip.patcher.model_state_dict().items()}}
    m1, c1 = LoraEngineLoader().load(model, clip, "a.safetensors", 0.7, 0.4)
    before = {k: list(v) for k, v in m1.patches.items()}
    m2, c2 = LoraEngineLoader().load(m1, c1, "d.safetensors", -1.1, 0.9)
    assert all(m1.patches[k][-1][1] is v[-1][1] and len(m1.patches[k]) == 1 for k, v in before.items())  # kept
    assert all(len(v) == 1 for v in m2.patches.values()) and set(m2.patches) > set(m1.patches)
    ours = patched_state(m2) | patched_state(c2.patcher)
    ref = engine_state(engine, [(loras / "a.safetensors", 0.4, 0.7), (loras / "d.safetensors", 0.9, -1.1)])
    assert assert_equal_weights(ours, ref, base) > 20
    r1, rc1 = LoraEngineLoader().load(model, clip, "d.safetensors", -1.1, 0.9)
    r2, rc2 = LoraEngineLoader().load(r1, rc1, "a.safetensors", 0.7, 0.4)
    assert assert_equal_weights(patched_state(r2) | patched_state(rc2.patcher), ref, base) > 20


def test_foreign_patch_in_between_keeps_comfyui_chaining(loras, sd1):
    """A patch of another kind between two lora-engine nodes (e.g. a merge node's) is not folded over."""
    model, clip, m = sd1
    kohya_lora(loras / "a.safetensors", m, seed=1)
    m1, _ = LoraEngineLoader().load(model, clip, "a.safetensors", 1.0, 0.0)
    key = next(iter(m1.patches))
    mid = m1.clone()
    mid.add_patches({key: (torch.zeros_like(mid.model_state_dict()[key]),)}, 0.5)
    (m2,) = LoraEngineLoaderModelOnly().load(mid, "a.safetensors", 1.0)
    assert len(m2.patches[key]) == 3  # ours, the foreign diff, ours again
    other = next(k for k in m2.patches if k != key)
    assert len(m2.patches[other]) == 1  # nothing in between there: joined into one
    assert len(mid.patches[key]) == 2 and len(mid.patches[other]) == 1  # the input clone kept its lists
