"""Lumina-Image 2.0 LoRAs (grouped heads: k and v narrower than q) on a tiny diffusers
``Lumina2TransformerModel`` and its native tree (fused ``attention.qkv``). Oracles: diffusers' Lumina2 loader for
PEFT files on the tiny model; for native ``diffusion_model.…qkv`` files its converter, which hard-codes the released
split [2304, 768, 768], so those are compared at full width on the meta device through ΔW·P (probe P). Also: a
hand fp64 ΔW on the grouped rows, on the fly = merged, restore bit-exact."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import shapes_of
from lora_engine.keymap import build_keymap
from tests.families.test_flux_apply import _check, _close, _loaded, _merged, _onthefly_equals_merged, diffusers_oracle
from tests.families.test_flux_converters import _ours, _probe
from tests.fixtures.files.dit import respell
from tests.fixtures.files.flux import native_lora, peft_file, write
from tests.fixtures.models.dit import LUMINA2_FULL, lumina2_model
from tests.fixtures.models.flux import NativeTree, native_state

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "linear_1", "linear_2", "linear_3", "norm1.linear", "x_embedder"]


@pytest.fixture(scope="module")
def models():
    d = lumina2_model(seed=3)
    return d, NativeTree(native_state(d, "lumina2"))


def _pipeline():
    from diffusers import Lumina2Pipeline

    return Lumina2Pipeline


def _linears(shapes) -> list[str]:
    return [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]


def test_peft_diffusers_file(models, tmp_path):
    d, _ = models
    peft_file(d, tmp_path, seed=1, targets=TARGETS, pipeline=_pipeline())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    _check(models, path, diffusers_oracle(d, path, _pipeline()), family="lumina2")


def test_native_names_grouped_rows(models, tmp_path):
    """kohya ``lora_unet_layers_0_attention_qkv`` (24 + 8 + 8 rows): on the diffusers model to_q, to_k, to_v get
    rows [0,24), [24,32), [32,40) of α/r·up·down (fp64 by hand); native tree = diffusers tree through the rows."""
    d, n = models
    nshapes = shapes_of(n)
    mods = _linears(nshapes)
    t = native_lora(nshapes, 4, mods, alpha=3.0)
    path = write(t, tmp_path / "k.safetensors")
    got_d, rep = _merged(d, path)
    assert rep.unmatched == [] and rep.touched == len(mods) + 2 * sum(m.endswith(".qkv") for m in mods), rep.line()
    got_n, rep = _merged(n, path)
    assert rep.unmatched == [] and rep.touched == len(mods)
    _close(got_n, native_state(_loaded(d, got_d), "lumina2"), "native vs diffusers")
    k = "lora_unet_layers_1_attention_qkv"
    dw = 0.75 * t[k + ".lora_up.weight"].double() @ t[k + ".lora_down.weight"].double()
    base = d.state_dict()
    for name, (a, b) in (("to_q", (0, 24)), ("to_k", (24, 32)), ("to_v", (32, 40))):
        key = f"layers.1.attn.{name}.weight"
        assert torch.allclose(got_d[key].double(), base[key].double() + dw[a:b], atol=1e-6), key


@pytest.mark.parametrize("tree", ["native", "diffusers"])
def test_other_spellings(models, tmp_path, tree):
    """LyCORIS, ComfyUI and DiffSynth-bare spellings of the same tensors, module names of either tree."""
    d, n = models
    shapes = shapes_of(n if tree == "native" else d)
    mods = _linears(shapes)
    t = native_lora(shapes, 5, mods, alpha=4.0)
    for root in (d, n):
        want, _ = _merged(root, write(t, tmp_path / "k.safetensors"))
        for spelling in ("lycoris", "comfyui", "bare"):
            got, rep = _merged(root, write(respell(t, mods, spelling), tmp_path / f"{spelling}.safetensors"))
            assert rep.unmatched == [] and rep.touched, rep.line()
            assert [k for k in want if not torch.equal(got[k], want[k])] == [], spelling


def test_full_width_native_file_matches_diffusers(tmp_path):
    """``diffusion_model.<native>.lora_A/B`` on Lumina-Image-2.0's real widths: diffusers' converter (its hard-coded
    [2304, 768, 768] split) and the engine's map on the full diffusers tree give every layer the same ΔW·P."""
    dshapes = shapes_of(lumina2_model(LUMINA2_FULL, meta=True))
    nshapes = {k: tuple(v.shape) for k, v in native_state(lumina2_model(LUMINA2_FULL, meta=True), "lumina2").items()}
    mods = [f"{s}.0.{m}" for s in ("noise_refiner", "context_refiner", "layers")
            for m in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                      "adaLN_modulation.1") if f"{s}.0.{m}.weight" in nshapes]
    path = write(respell(native_lora(nshapes, 3, mods, alpha=4.0), mods, "ai_toolkit"), tmp_path / "f.safetensors")
    ours = _ours(path, dshapes)
    sd = _pipeline().lora_state_dict(str(path))
    theirs = {}
    for k in sd:
        if k.endswith("lora_A.weight"):
            a, b = sd[k].double(), sd[k.replace("lora_A", "lora_B")].double()
            theirs[k[: -len(".lora_A.weight")].removeprefix("transformer.") + ".weight"] = b @ (a @ _probe(a.shape[1]))
    assert set(ours) == set(theirs) and len(ours) == len(mods) + 2 * 3
    for k in theirs:
        assert torch.allclose(ours[k], theirs[k], atol=1e-9), k


@pytest.mark.parametrize("tree", ["diffusers", "native"])
def test_onthefly_equals_merged(models, tmp_path, tree):
    d, n = models
    nshapes = shapes_of(n)
    _onthefly_equals_merged(d if tree == "diffusers" else n,
                            write(native_lora(nshapes, 8, _linears(nshapes)), tmp_path / "k.safetensors"))


def test_z_image_and_lumina2_are_told_apart():
    """Both native trees have ``layers.0.attention.qkv``: the modulation's index decides."""
    from tests.fixtures.models.dit import z_image_model

    z = {k: tuple(v.shape) for k, v in native_state(z_image_model(meta=True), "z_image").items()}
    lu = {k: tuple(v.shape) for k, v in native_state(lumina2_model(meta=True), "lumina2").items()}
    assert build_keymap(z).architecture == "z_image" and build_keymap(lu).architecture == "lumina2"


def test_lumina2_lora_on_z_image(tmp_path):
    """A Lumina 2 LoRA in native names (the same names as Z-Image's, other widths) on Z-Image's native tree: one
    line naming Lumina 2, nothing changed."""
    from tests.families.test_bad_input import _apply
    from tests.fixtures.models.dit import z_image_model

    lu = {k: tuple(v.shape) for k, v in native_state(lumina2_model(meta=True), "lumina2").items()}
    path = write(native_lora(lu, 2, _linears(lu)), tmp_path / "lumina.safetensors")
    lines, changed = _apply(NativeTree(native_state(z_image_model(seed=2), "z_image")), path)
    assert changed == [] and len(lines) == 1 and "Lumina 2 LoRA on a Z-Image model" in lines[0], lines
