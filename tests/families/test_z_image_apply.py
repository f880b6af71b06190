"""Z-Image LoRAs on a tiny diffusers ``ZImageTransformer2DModel`` (split q/k/v) and on its native tree (fused
``attention.qkv``, ComfyUI names), in the dialects Z-Image trainers write (all in diffusers names). Oracle:
diffusers' ``ZImagePipeline.lora_state_dict`` (which un-flattens musubi names by its own rule) ->
``load_lora_adapter``, peft merge; the native tree's result through the declaration's rows. Also: on the fly =
merged, restore bit-exact, grouped-query row sizes from the config, other families untouched."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from tests.families.test_bad_input import _apply
from tests.families.test_flux_apply import _check, _close, _loaded, _merged, _onthefly_equals_merged, diffusers_oracle
from tests.fixtures.files.dit import respell
from tests.fixtures.files.flux import native_lora, peft_file, write
from tests.fixtures.models.dit import z_image_model
from tests.fixtures.models.flux import NativeTree, native_state

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
           "layers.0.adaLN_modulation.0", "noise_refiner.0.adaLN_modulation.0", "all_x_embedder.2-1",
           "all_final_layer.2-1.linear", "cap_embedder.1"]


@pytest.fixture(scope="module")
def models():
    d = z_image_model(seed=3)
    return d, NativeTree(native_state(d, "z_image"))


def _pipeline():
    from diffusers import ZImagePipeline

    return ZImagePipeline


def _linears(shapes) -> list[str]:
    return [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]


def test_peft_diffusers_file(models, tmp_path):
    d, _ = models
    peft_file(d, tmp_path, seed=1, targets=TARGETS, pipeline=_pipeline())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    _check(models, path, diffusers_oracle(d, path, _pipeline()), family="z_image")


@pytest.mark.parametrize("spelling", ["kohya", "comfyui", "ai_toolkit", "default", "bare"])
def test_dialects(models, tmp_path, spelling):
    """musubi ``lora_unet_layers_0_attention_to_q`` (α ≠ r; ComfyUI does not load these), ComfyUI-style
    ``diffusion_model.…lora_down``, ai-toolkit ``diffusion_model.…lora_A``, ``.lora_A.default.weight``, DiffSynth
    bare keys (diffusers reads them only under a ``transformer.`` prefix; the oracle adds it)."""
    d, _ = models
    dshapes = shapes_of(d)
    mods = _linears(dshapes)
    alpha = 3.0 if spelling in ("kohya", "comfyui") else 4.0
    path = write(respell(native_lora(dshapes, 5, mods, alpha=alpha), mods, spelling), tmp_path / f"{spelling}.safetensors")
    lf = load_lora(path)
    assert lf.unknown_keys == [] and len(lf.modules) == len(mods)
    _check(models, path, diffusers_oracle(d, path, _pipeline()), family="z_image")


def test_lycoris_prefix(models, tmp_path):
    d, n = models
    dshapes = shapes_of(d)
    mods = _linears(dshapes)
    t = native_lora(dshapes, 6, mods, alpha=2.0)
    for root in (d, n):
        want, _ = _merged(root, write(t, tmp_path / "k.safetensors"))
        got, rep = _merged(root, write(respell(t, mods, "lycoris"), tmp_path / "l.safetensors"))
        assert rep.unmatched == [] and rep.touched, rep.line()
        assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_native_fused_names(models, tmp_path):
    """A LoRA on the native modules (``layers.0.attention.qkv``…): on the diffusers model its delta rows land on
    ``to_q``/``to_k``/``to_v``; the same as on the native tree."""
    d, n = models
    nshapes = shapes_of(n)
    path = write(native_lora(nshapes, 7, _linears(nshapes), alpha=3.0), tmp_path / "n.safetensors")
    got_d, rep = _merged(d, path)
    assert rep.unmatched == [] and rep.touched == len(_linears(nshapes)) + 2 * 3, rep.line()
    got_n, rep = _merged(n, path)
    assert rep.unmatched == []
    _close(got_n, native_state(_loaded(d, got_d), "z_image"), "native vs diffusers")


@pytest.mark.parametrize("tree", ["diffusers", "native"])
def test_onthefly_equals_merged(models, tmp_path, tree):
    d, n = models
    dshapes = shapes_of(d)
    _onthefly_equals_merged(d if tree == "diffusers" else n,
                            write(native_lora(dshapes, 8, _linears(dshapes)), tmp_path / "k.safetensors"))


def test_grouped_query_rows_from_config():
    """A native tree with grouped heads (q 4 heads, k and v 2 heads of 8): to_q/to_k/to_v are rows [0,32),
    [32,48), [48,64) of ``qkv`` (q from the output projection's input width), not thirds of its height."""
    n = native_state(z_image_model(meta=True), "z_image")
    shapes = {k: tuple(v.shape) for k, v in n.items()}
    for s in ("layers", "noise_refiner", "context_refiner"):
        shapes[f"{s}.0.attention.qkv.weight"] = (64, 16)
        shapes[f"{s}.0.attention.out.weight"] = (16, 32)
        shapes[f"{s}.0.attention.q_norm.weight"] = shapes[f"{s}.0.attention.k_norm.weight"] = (8,)
    km = build_keymap(shapes)
    cfg = km.family.config(shapes, "native")
    assert (cfg["heads"], cfg["kv_heads"], cfg["head_dim"]) == (4, 2, 8)
    rows = [km.lookup(f"lora_unet_layers_0_attention_{p}").rows for p in ("to_q", "to_k", "to_v")]
    assert rows == [(0, 32), (32, 48), (48, 64)]
    shapes["layers.0.attention.qkv.weight"] = (63, 16)
    with pytest.raises(Exception, match="qkv has 63 rows"):
        build_keymap(shapes)


def test_other_families_untouched(tmp_path):
    """A Z-Image LoRA on Qwen-Image and a Qwen-Image LoRA on Z-Image: one line naming the family, nothing changed."""
    from tests.fixtures.models.dit import qwen_model

    qwen, z = qwen_model(seed=1), z_image_model(seed=1)
    zs, qs = shapes_of(z), shapes_of(qwen)
    lines, changed = _apply(qwen, write(native_lora(zs, 3, _linears(zs)), tmp_path / "z.safetensors"))
    assert changed == [] and len(lines) == 1 and "Z-Image LoRA on a Qwen-Image model" in lines[0], lines
    lines, changed = _apply(z, write(native_lora(qs, 4, _linears(qs)), tmp_path / "q.safetensors"))
    assert changed == [] and len(lines) == 1 and "Qwen-Image LoRA on a Z-Image model" in lines[0], lines
