"""The prompt-tag node: cleaned text out, tags applied as the engine applies the same stack, the
CONDITIONING encoded with the patched text encoder, bad tags skipped with one warning each."""
from __future__ import annotations

import pytest
import torch

from comfy_nodes.prompt_tags import LoraEnginePromptTags
from lora_engine.formats import load_lora
from lora_engine.patch import StackEntry
from comfy_nodes.schedule import keyframes
from lora_engine.syntax.prompt import parse_prompt
from tests.fixtures.files.comfy import kohya_lora, lycoris_file
from tests.hosts.comfy.helpers import assert_equal_weights, engine_state, patched_state
from tests.hosts.comfy.standin import encode_ids


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("lora_engine")]


def test_tags_applied_and_text_cleaned(loras, sd1, engine, caplog):
    model, clip, m = sd1
    (loras / "styles").mkdir()
    kohya_lora(loras / "styles" / "ink.safetensors", m, seed=4)
    lycoris_file(loras / "hada.safetensors", m, "loha")
    text = "a cat <lora:ink:0.8:0.5>, sitting\n<lora:hada:1:unet=-0.4> on a mat <lora:nothere:1> <hypernet:x:1>"
    new_model, new_clip, cond, cleaned = LoraEnginePromptTags().apply(model, clip, text)
    assert cleaned == "a cat , sitting\non a mat <hypernet:x:1>"
    assert model.patches == {} and clip.patcher.patches == {}
    warns = _warnings(caplog)
    assert len(warns) == 1 and "<lora:nothere:1>" in warns[0] and "not found" in warns[0]
    base = {**model.model_state_dict(), **clip.patcher.model_state_dict()}
    base = {k: v.clone() for k, v in base.items()}
    ref = engine_state(engine, [(loras / "styles" / "ink.safetensors", 0.8, 0.5), (loras / "hada.safetensors", 1.0, -0.4)])
    ours = patched_state(new_model) | patched_state(new_clip.patcher)
    assert assert_equal_weights(ours, ref, base) > 20
    # the CONDITIONING is the cleaned text encoded by the text encoder carrying te=0.8
    engine.set_stack([StackEntry(load_lora(loras / "styles" / "ink.safetensors"), te=0.8, unet=0.5)])
    try:
        with torch.no_grad():
            want = encode_ids(_clip_part(engine.root), clip.tokenize(cleaned)["ids"])
    finally:
        engine.restore()
    torch.testing.assert_close(cond[0][0], want, rtol=0, atol=0)
    with torch.no_grad():
        plain = encode_ids(clip.cond_stage_model, clip.tokenize(cleaned)["ids"])
    assert (plain - want).abs().max() > 1e-4  # the text-encoder LoRA changed the encoding


def _clip_part(root):
    holder = torch.nn.Module()
    holder.clip_l = root.clip_l
    return holder


def test_is_changed_follows_the_tagged_files(loras, sd1):
    import os

    _, _, m = sd1
    kohya_lora(loras / "ink.safetensors", m)
    text = "x <lora:ink:1> <lora:gone:1>"
    sig = LoraEnginePromptTags.IS_CHANGED(text)
    assert sig == LoraEnginePromptTags.IS_CHANGED(text, steps=3) and "missing:gone" in sig
    st = os.stat(loras / "ink.safetensors")
    os.utime(loras / "ink.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert LoraEnginePromptTags.IS_CHANGED(text) != sig


def test_no_tags_passes_models_through(loras, sd1):
    model, clip, _ = sd1
    new_model, new_clip, cond, cleaned = LoraEnginePromptTags().apply(model, clip, "just  text")
    assert new_model is model and new_clip is clip and cleaned == "just  text"
    assert cond[0][0].shape[0] == 1


def test_scheduled_tag_without_hooks_applies_statically_with_warning(loras, sd1, caplog):
    model, clip, m = sd1
    kohya_lora(loras / "ink.safetensors", m)
    new_model, _, _, cleaned = LoraEnginePromptTags().apply(model, clip, "x <lora:ink:1:start=0.25>")
    assert cleaned == "x"
    warns = _warnings(caplog)
    assert len(warns) == 1 and "hooks" in warns[0]
    assert new_model.patches  # applied for the whole run


def test_step_number_without_steps_warns(loras, sd1, caplog):
    model, clip, m = sd1
    kohya_lora(loras / "ink.safetensors", m)
    LoraEnginePromptTags().apply(model, clip, "x <lora:ink:1:stop=10>")
    assert any("the node's 'steps' input" in w for w in _warnings(caplog))


@pytest.mark.parametrize("start,stop,want", [
    (None, None, [(1.0, 0.0)]),
    (0.25, None, [(0.0, 0.0), (1.0, 0.25)]),
    (None, 0.6, [(1.0, 0.0), (0.0, 0.6)]),
    (0.2, 0.7, [(0.0, 0.0), (1.0, 0.2), (0.0, 0.7)]),
    (0.7, 0.2, [(0.0, 0.0), (0.0, 0.7)]),
])
def test_keyframes(start, stop, want):
    assert keyframes(start, stop) == want


def test_tag_window_steps_and_fractions():
    tag = parse_prompt("<lora:a:1:start=5:stop=0.5>").tags[0]
    assert tag.window.fractions(20) == ((5 - 1) / 20, (10 - 1) / 20)  # step 5 of 20 starts at 0.2; 0.5 → step 10
    frac = parse_prompt("<lora:a:1:start=0.3>").tags[0]
    assert frac.window.fractions(0) == (0.3, None)
    with pytest.raises(ValueError):
        tag.window.fractions(0)
