"""The loader nodes patch ComfyUI clones so that the weights ComfyUI runs with equal lora-engine's own
merged weights, bit for bit (ComfyUI merges in an fp32 working copy on CPU, as the engine does),
for kohya LoRA, LoCon, LoHa, LoKr and DoRA files at positive and negative strengths; the
incoming MODEL/CLIP are left as they were."""
from __future__ import annotations

import pytest
import torch

from comfy_nodes.loader import LoraEngineLoader, LoraEngineLoaderModelOnly
from comfy_nodes.stack import LoraEngineStack
from lora_engine.formats import load_lora
from tests.fixtures.files.comfy import kohya_lora, lycoris_file
from tests.hosts.comfy.helpers import assert_equal_weights, engine_state, patched_state

STRENGTHS = [(1.0, 1.0), (-0.7, 0.45)]


def _base(sd1):
    model, clip, _ = sd1
    return {**{k: v.detach().clone() for k, v in model.model_state_dict().items()},
            **{k: v.detach().clone() for k, v in clip.patcher.model_state_dict().items()}}


@pytest.mark.parametrize("sm,sc", STRENGTHS)
def test_kohya_lora_matches_engine(loras, sd1, engine, sm, sc):
    model, clip, m = sd1
    kohya_lora(loras / "kohya.safetensors", m)
    base = _base(sd1)
    new_model, new_clip = LoraEngineLoader().load(model, clip, "kohya.safetensors", sm, sc)
    assert new_model is not model and new_clip is not clip
    assert model.patches == {} and clip.patcher.patches == {}  # upstream untouched
    ours = patched_state(new_model) | patched_state(new_clip.patcher)
    ref = engine_state(engine, [(loras / "kohya.safetensors", sc, sm)])
    changed = assert_equal_weights(ours, ref, base)
    assert changed == len(new_model.patches) + len(new_clip.patcher.patches) > 20
    assert any(k.startswith("clip_l.") for k in new_clip.patcher.patches)
    for k, v in _base(sd1).items():  # unpatch restored every weight bit for bit
        assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("case", ["locon", "loha", "lokr", "dora", "dora-in"])
@pytest.mark.parametrize("sm", [1.0, -0.6])
def test_lycoris_files_match_engine(loras, sd1, engine, case, sm):
    model, clip, m = sd1
    lycoris_file(loras / f"{case}.safetensors", m, case)
    base = _base(sd1)
    new_model, new_clip = LoraEngineLoader().load(model, clip, f"{case}.safetensors", sm, 1.0)
    assert new_clip is clip  # a UNet-only file patches no text encoder: the CLIP is passed through
    ours = patched_state(new_model)
    ref = engine_state(engine, [(loras / f"{case}.safetensors", 1.0, sm)])
    changed = assert_equal_weights(ours, ref, base)
    assert changed == len(new_model.patches) > 20
    if case == "locon":
        assert any(k.endswith("in_layers.2.weight") for k in new_model.patches)  # 3×3 convs reached


def test_model_only_skips_text_encoder_quietly(loras, sd1, engine, caplog):
    model, _, m = sd1
    kohya_lora(loras / "kohya.safetensors", m)
    base = _base(sd1)
    (new_model,) = LoraEngineLoaderModelOnly().load(model, "kohya.safetensors", 0.8)
    ref = engine_state(engine, [(loras / "kohya.safetensors", 0.0, 0.8)])
    assert_equal_weights(patched_state(new_model), ref, base)
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("lora_engine")]


def test_stack_equals_engine_stack(loras, sd1, engine):
    model, clip, m = sd1
    kohya_lora(loras / "a.safetensors", m, seed=1)
    lycoris_file(loras / "b.safetensors", m, "loha")
    kohya_lora(loras / "off.safetensors", m, seed=2)
    base = _base(sd1)
    kw = dict(lora_1="a.safetensors", strength_model_1=0.6, strength_clip_1=-0.3,
              lora_2="off.safetensors", on_2=False, lora_3="b.safetensors", strength_model_3=-0.9)
    new_model, new_clip = LoraEngineStack().apply(model, clip, **kw)
    ours = patched_state(new_model) | patched_state(new_clip.patcher)
    ref = engine_state(engine, [(loras / "a.safetensors", -0.3, 0.6), (loras / "b.safetensors", 1.0, -0.9)])
    assert assert_equal_weights(ours, ref, base) > 20


def test_block_weights_match_engine(loras, sd1, engine):
    from lora_engine.patch import StackEntry
    from lora_engine.syntax.blocks import lbw_ratios

    model, clip, m = sd1
    kohya_lora(loras / "kohya.safetensors", m)
    base = _base(sd1)
    new_model, new_clip = LoraEngineLoader().load(model, clip, "kohya.safetensors", 1.0, 1.0, "OUTD")
    ours = patched_state(new_model) | patched_state(new_clip.patcher)
    entry = StackEntry(load_lora(loras / "kohya.safetensors"), block_multiplier=lbw_ratios("OUTD"))
    changed = assert_equal_weights(ours, engine_state(engine, [entry]), base)
    full = LoraEngineLoader().load(model, clip, "kohya.safetensors", 1.0, 1.0)[0]
    assert 0 < len(new_model.patches) < len(full.patches)
    assert changed > 0


def test_bad_block_weights_is_one_clear_error(loras, sd1):
    from lora_engine.errors import LoraEngineError

    model, clip, m = sd1
    kohya_lora(loras / "kohya.safetensors", m)
    with pytest.raises(LoraEngineError, match="kohya.safetensors: block weights 'NOPE'"):
        LoraEngineLoader().load(model, clip, "kohya.safetensors", 1.0, 1.0, "NOPE")


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_kohya_lora_sd2_sdxl_match_engine(loras, arch):
    """SD2's ``clip_h`` and SDXL's ``clip_l`` + ``clip_g`` (``lora_te1_``/``lora_te2_``) in the CLIP patcher."""
    from lora_engine.engine import LoraEngine, shapes_of
    from lora_engine.keymap import build_keymap
    from tests.hosts.comfy.models import comfy_pair, reference_root

    model, clip, m = comfy_pair(arch)
    kohya_lora(loras / "k.safetensors", m, te_prefix="lora_te1_" if arch == "sdxl" else "lora_te_")
    base = _base((model, clip, m))
    new_model, new_clip = LoraEngineLoader().load(model, clip, "k.safetensors", -0.8, 1.3)
    root = reference_root(arch)
    ref = engine_state(LoraEngine(root, build_keymap(shapes_of(root))), [(loras / "k.safetensors", 1.3, -0.8)])
    ours = patched_state(new_model) | patched_state(new_clip.patcher)
    n_modules = len(load_lora(loras / "k.safetensors").modules)
    assert assert_equal_weights(ours, ref, base) == n_modules
    prefixes = {k.split(".")[0] for k in new_clip.patcher.patches}
    assert prefixes == ({"clip_l", "clip_g"} if arch == "sdxl" else {"clip_h"})
