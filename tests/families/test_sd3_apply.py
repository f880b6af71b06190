"""SD3 / SD3.5-Medium LoRAs on tiny diffusers ``SD3Transformer2DModel`` s and on their native trees (fused
``qkv``, swapped last context adaLN). peft/diffusers files: diffusers' own SD3 loader is the oracle.
kohya SD3 files (``lora_unet_joint_blocks_…``): diffusers has no converter for them (they load as
nothing there), so the check is native tree = diffusers tree through the declaration's rows, plus a
hand-computed ΔW on a fused layer."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import shapes_of
from tests.fixtures.files.flux import native_lora, peft_file, write
from tests.families.test_flux_apply import _check, _close, _loaded, _merged, _onthefly_equals_merged, diffusers_oracle
from tests.fixtures.models.flux import TINY_SD3, TINY_SD35M, NativeTree, native_state, sd3_model

pytest.importorskip("diffusers")
pytest.importorskip("peft")

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
               "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder"]


@pytest.fixture(scope="module", params=["sd3", "sd3.5-medium"])
def models(request):
    d = sd3_model(TINY_SD3 if request.param == "sd3" else TINY_SD35M, seed=4)
    return d, NativeTree(native_state(d, "sd3"))


def test_peft_diffusers_file(models, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    d, _ = models
    peft_file(d, tmp_path, seed=1, targets=SD3_TARGETS, pipeline=StableDiffusion3Pipeline)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    _check(models, path, diffusers_oracle(d, path, StableDiffusion3Pipeline), family="sd3")


def _kohya_modules(nshapes) -> list[str]:
    return [k[: -len(".weight")] for k, s in nshapes.items()
            if k.startswith("joint_blocks.") and k.endswith(".weight") and len(s) == 2]


def test_kohya_sd3_both_trees(models, tmp_path):
    d, n = models
    nshapes = shapes_of(n)
    mods = _kohya_modules(nshapes) + ["final_layer.adaLN_modulation.1", "context_embedder"]
    t = native_lora(nshapes, 3, mods, alpha=3.0)
    path = write(t, tmp_path / "k.safetensors")
    got_d, rep = _merged(d, path)
    # a fused qkv reaches 3 layers, each swapped adaLN (final, last context block) 2 row blocks
    assert rep.unmatched == [] and rep.touched == len(mods) + sum(".qkv" in m for m in mods) * 2 + 2
    got_n, rep = _merged(n, path)
    assert rep.unmatched == [] and rep.touched == len(mods)
    _close(got_n, native_state(_loaded(d, got_d), "sd3"), "native vs diffusers")
    key = "joint_blocks.0.x_block.attn.qkv"
    up, down = t[f"lora_unet_{key.replace('.', '_')}.lora_up.weight"], t[f"lora_unet_{key.replace('.', '_')}.lora_down.weight"]
    want = n.state_dict()[key + ".weight"].double() + 0.75 * up.double() @ down.double()
    assert torch.allclose(got_n[key + ".weight"].double(), want, atol=1e-6)


@pytest.mark.parametrize("tree", ["diffusers", "native"])
def test_onthefly_equals_merged(models, tmp_path, tree):
    d, n = models
    nshapes = shapes_of(n)
    path = write(native_lora(nshapes, 7, _kohya_modules(nshapes)), tmp_path / "k.safetensors")
    _onthefly_equals_merged(d if tree == "diffusers" else n, path)
