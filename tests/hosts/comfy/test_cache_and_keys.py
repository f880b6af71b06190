"""Caching (a strength change reads no file), one warning line per LoRA for unmatched keys with the
core's diagnosis, and diffusers/PEFT files applied in full (ComfyUI skips their attention keys)."""
from __future__ import annotations

import os

import torch

import lora_engine.cache
from comfy_nodes import loading
from comfy_nodes.loader import LoraEngineLoader
from tests.hosts.comfy.files import diffusers_peft_lora, kohya_lora
from tests.hosts.comfy.helpers import assert_equal_weights, engine_state, patched_state


def _count_loads(monkeypatch) -> list:
    calls = []
    real = lora_engine.cache.load_lora

    def counting(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(lora_engine.cache, "load_lora", counting)  # counts the cache's file reads
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
    extra = {k.replace("lora_te_", "lora_te2_", 1): v.clone() for k, v in sd.items() if k.startswith("lora_te_")}
    save_file(sd | extra, str(loras / "xl.safetensors"))
    new_model, new_clip = LoraEngineLoader().load(model, clip, "xl.safetensors", 1.0, 1.0)
    warns = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warns) == 1, warns
    n_te2 = len({k.split(".")[0] for k in extra})
    assert "xl" in warns[0] and f"{n_te2} module(s) matched nothing" in warns[0] and "SDXL" in warns[0]
    assert new_model.patches and new_clip.patcher.patches  # the rest still applies


def test_diffusers_peft_file_applies_every_key(loras, sd1, engine, caplog):
    model, clip, m = sd1
    n = diffusers_peft_lora(loras / "peft.safetensors", m)
    base = {k: v.clone() for k, v in model.model_state_dict().items()}
    new_model, new_clip = LoraEngineLoader().load(model, clip, "peft.safetensors", 0.9, 1.0)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
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


def test_chained_loaders_add_up(loras, sd1, engine):
    """Two chained loader nodes (ComfyUI's usual graph): the second adapter sees the first one's weight;
    for additive types the result is the engine's joint stack up to fp32 rounding."""
    model, clip, m = sd1
    kohya_lora(loras / "a.safetensors", m, seed=1)
    kohya_lora(loras / "b.safetensors", m, seed=2)
    m1, c1 = LoraEngineLoader().load(model, clip, "a.safetensors", 0.7, 0.4)
    m2, c2 = LoraEngineLoader().load(m1, c1, "b.safetensors", -1.1, 0.9)
    assert m1.patches and len(next(iter(m2.patches.values()))) == 2 and len(next(iter(m1.patches.values()))) == 1
    ours = patched_state(m2) | patched_state(c2.patcher)
    ref = engine_state(engine, [(loras / "a.safetensors", 0.4, 0.7), (loras / "b.safetensors", 0.9, -1.1)])
    for k, v in ours.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=2e-7)
