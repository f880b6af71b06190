"""Qwen-Image LoRAs on a tiny diffusers ``QwenImageTransformer2DModel`` (native = diffusers names) in every
dialect its trainers write. Oracle: diffusers' own loader (``QwenImagePipeline.lora_state_dict`` ->
``load_lora_adapter``, peft merge), which un-flattens musubi names by its own rule. Checked: merged weights =
the oracle's, on the fly = merged, restore bit-exact, and LoRAs of other families change nothing."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import shapes_of
from lora_engine.formats import load_lora
from tests.families.test_bad_input import _apply
from tests.families.test_flux_apply import _close, _merged, _onthefly_equals_merged, diffusers_oracle
from tests.fixtures.files.dit import respell
from tests.fixtures.files.flux import native_lora, peft_file, write
from tests.fixtures.models.dit import qwen_model

pytest.importorskip("diffusers")
pytest.importorskip("peft")

# what ai-toolkit / musubi-tuner train: every Linear of the blocks; top layers by option
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
           "img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"]


@pytest.fixture(scope="module")
def model():
    return qwen_model(seed=3)


def _modules(shapes) -> list[str]:
    return [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]


def _pipeline():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline


def _same_as_oracle(model, path):
    got, rep = _merged(model, path)
    assert rep.unmatched == [] and rep.touched, rep.line()
    _close(got, diffusers_oracle(model, path, _pipeline()), "qwen-image")
    base = model.state_dict()
    assert any(not torch.equal(base[k], got[k]) for k in base if "to_q" in k), "the LoRA changed nothing"
    return rep


def test_peft_diffusers_file(model, tmp_path):
    peft_file(model, tmp_path, seed=1, targets=TARGETS, pipeline=_pipeline())
    _same_as_oracle(model, tmp_path / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("spelling", ["kohya", "comfyui", "ai_toolkit", "default", "bare"])
def test_dialects(model, tmp_path, spelling):
    """musubi ``lora_unet_transformer_blocks_0_attn_to_q`` (α ≠ r), ComfyUI ``diffusion_model.…lora_down``,
    ai-toolkit ``diffusion_model.…lora_A``, ``…lora_A.default.weight`` and DiffSynth bare keys (diffusers
    reads bare keys only under a ``transformer.`` prefix; the oracle adds it)."""
    shapes = shapes_of(model)
    mods = _modules(shapes)
    alpha = 3.0 if spelling in ("kohya", "comfyui") else 4.0
    tensors = respell(native_lora(shapes, 5, mods, alpha=alpha), mods, spelling)
    path = write(tensors, tmp_path / f"{spelling}.safetensors")
    lf = load_lora(path)
    assert lf.unknown_keys == [] and len(lf.modules) == len(mods)
    rep = _same_as_oracle(model, path)
    assert rep.touched == len(mods)


def test_lycoris_prefix_is_the_kohya_spelling(model, tmp_path):
    """LyCORIS ``lycoris_transformer_blocks_0_attn_to_q`` (no diffusers reader): the same ΔW as kohya's spelling."""
    shapes = shapes_of(model)
    mods = _modules(shapes)
    t = native_lora(shapes, 6, mods, alpha=2.0)
    want, _ = _merged(model, write(t, tmp_path / "k.safetensors"))
    got, rep = _merged(model, write(respell(t, mods, "lycoris"), tmp_path / "l.safetensors"))
    assert rep.unmatched == [] and rep.touched == len(mods)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_onthefly_equals_merged(model, tmp_path):
    shapes = shapes_of(model)
    _onthefly_equals_merged(model, write(native_lora(shapes, 7, _modules(shapes)), tmp_path / "k.safetensors"))


def test_flux_lora_on_qwen_and_back(tmp_path):
    """A Flux.1 LoRA (diffusers names, some of which Qwen-Image shares) on Qwen-Image, and a Qwen-Image
    LoRA on Flux.1: one line naming the family, the model untouched."""
    from tests.fixtures.models.flux import flux_model

    flux = flux_model(seed=1)
    peft_file(flux, tmp_path, seed=2)
    lines, changed = _apply(qwen_model(seed=1), tmp_path / "pytorch_lora_weights.safetensors")
    assert changed == [] and len(lines) == 1 and "LoRA on a Qwen-Image model" in lines[0], lines
    qwen = qwen_model(seed=1)
    shapes = shapes_of(qwen)
    path = write(native_lora(shapes, 3, _modules(shapes)), tmp_path / "q.safetensors")
    lines, changed = _apply(flux, path)
    assert changed == [] and len(lines) == 1 and "Qwen-Image LoRA on a Flux.1 model" in lines[0], lines


def test_full_size_blocks():
    """Qwen-Image's 60 blocks: block ids for block weights, from either spelling of a name."""
    from lora_engine.keymap import build_keymap
    from tests.fixtures.models.dit import QWEN_IMAGE

    shapes = shapes_of(qwen_model(QWEN_IMAGE, meta=True))
    km = build_keymap({"diffusion_model." + k: s for k, s in shapes.items()})
    assert km.architecture == "qwen_image" and len(km.family.blocks(km.family.config(shapes, "diffusers"))) == 60
    assert km.block_of("lora_unet_transformer_blocks_59_attn_to_add_out") == "transformer_blocks.59"
    assert km.lookup("lora_unet_transformer_blocks_59_img_mlp_net_0_proj").shape == (4 * 3072, 3072)
