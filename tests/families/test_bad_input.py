"""LoRAs for another family or another size: one line with the diagnosis, the model untouched."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.families import FamilyMismatch
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from tests.fixtures.files.flux import flux_modules, native_lora, write
from tests.fixtures.models.flux import TINY_FLUX, TINY_SD3, NativeTree, flux_model, native_state, sd3_model

pytest.importorskip("diffusers")


def _apply(root, path):
    before = {k: v.clone() for k, v in root.state_dict().items()}
    engine = LoraEngine(root, build_keymap(shapes_of(root)), mode="merged")
    engine.set_stack([StackEntry(load_lora(path))])
    lines = engine.warnings()
    changed = [k for k, v in root.state_dict().items() if not torch.equal(before[k], v)]
    engine.restore()
    return lines, changed


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    n = NativeTree(native_state(flux_model(seed=1)))
    nshapes = shapes_of(n)
    return write(native_lora(nshapes, 2, flux_modules(nshapes)), tmp_path_factory.mktemp("f") / "flux.safetensors")


def test_flux_lora_on_sd3(flux_file):
    lines, changed = _apply(sd3_model(seed=1), flux_file)
    assert changed == [] and len(lines) == 1 and "\n" not in lines[0]
    assert "Flux.1 LoRA on an SD3 model" in lines[0] and "flux: " in lines[0]


def test_flux_lora_on_sdxl(flux_file):
    from tests.fixtures.models.hosts import diffusers_root
    from tests.fixtures.models.tiny_sd import TinySD

    lines, changed = _apply(diffusers_root(TinySD.build("sdxl", 0)), flux_file)
    assert changed == [] and len(lines) == 1 and "Flux.1 LoRA on an SDXL model" in lines[0]


def test_other_size_of_the_same_family(tmp_path):
    """An SD3 LoRA made for a wider model (as SD3.5-Large's on 3.5-Medium): names match, shapes do not."""
    wide = NativeTree(native_state(sd3_model(dict(TINY_SD3, num_attention_heads=6, caption_projection_dim=48), seed=2), "sd3"))
    nshapes = shapes_of(wide)
    mods = [k[:-7] for k, s in nshapes.items() if k.startswith("joint_blocks.") and k.endswith(".weight") and len(s) == 2]
    path = write(native_lora(nshapes, 3, mods), tmp_path / "wide.safetensors")
    for model in (sd3_model(seed=2), NativeTree(native_state(sd3_model(seed=2), "sd3"))):
        lines, changed = _apply(model, path)
        assert changed == [] and len(lines) == 1
        assert "have the name but another shape" in lines[0] and "rows" in lines[0] or "vs weight" in lines[0]


def test_fused_lora_of_another_height_on_split_model(tmp_path):
    """A qkv LoRA 3·48 rows high on a model whose q, k, v are 32 rows each: the split refuses it whole."""
    shapes = {"double_blocks.0.img_attn.qkv.weight": (144, 32)}
    path = write(native_lora(shapes, 4, ["double_blocks.0.img_attn.qkv"]), tmp_path / "q.safetensors")
    lines, changed = _apply(flux_model(seed=3), path)
    assert changed == [] and len(lines) == 1
    assert "delta of 144 rows, this model's layers under that name have 96 rows in all" in lines[0]


def test_native_tree_with_foreign_fused_layout():
    """A native Flux tree whose linear1 is not q+k+v+mlp high: the key map says so, in one line."""
    state = {k: tuple(v.shape) for k, v in native_state(flux_model(TINY_FLUX, meta=True)).items()}
    state["single_blocks.0.linear1.weight"] = (200, 32)
    with pytest.raises(FamilyMismatch, match="single_blocks.0.linear1 has 200 rows") as e:
        build_keymap(state)
    assert "\n" not in str(e.value)
