"""merge, resize and extract on Flux.1 LoRAs and checkpoints: the written kohya files use sd-scripts'
native names (``lora_unet_double_blocks_0_img_attn_qkv``; split q/k/v/mlp pieces stacked exactly) whatever
the inputs' dialect, and give the weights the engine gives for the inputs (merge: the weighted stack;
resize at full rank: the source; extract: the tuned checkpoint, rank(ΔW) ≤ the asked rank)."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.formats import load_lora
from lora_engine.patch import StackEntry
from lora_engine.tools.extract import extract_file
from lora_engine.tools.merge import merge_files
from lora_engine.tools.resize import resize_file
from tests.fixtures.files.flux import flux_modules, native_lora, peft_file, write

pytest.importorskip("diffusers")
pytest.importorskip("peft")



def _weights(root, stack: list[tuple[str, float]]) -> dict:
    engine = LoraEngine.for_model(root, mode="merged")
    engine.set_stack([StackEntry(load_lora(p), unet=w, key=f"{i}") for i, (p, w) in enumerate(stack)])
    assert engine.warnings() == []
    out = {k: v.clone() for k, v in root.state_dict().items()}
    engine.restore()
    return out


def _close(a: dict, b: dict, atol: float) -> None:
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max err {(a[k] - b[k]).abs().max()}"


def _native_names(path) -> set[str]:
    names = set(load_lora(path).modules)
    assert names and all(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_img_in",
                                       "lora_unet_txt_in", "lora_unet_final_layer_", "lora_unet_time_in",
                                       "lora_unet_vector_in", "lora_unet_guidance_in")) for n in names), names
    return names


def test_merge_kohya_and_diffusers_files(flux, tmp_path):
    d, n = flux
    nshapes = shapes_of(n)
    a = write(native_lora(nshapes, 1, flux_modules(nshapes)), tmp_path / "a.safetensors")
    peft_file(d, tmp_path, seed=2)
    b = str(tmp_path / "pytorch_lora_weights.safetensors")
    res = merge_files([(a, 0.5), (b, -1.0)], tmp_path / "m.safetensors")
    names = _native_names(tmp_path / "m.safetensors")
    assert "lora_unet_single_blocks_0_linear1" in names and any("rank" in w for w in res.warnings)
    for root in (n, d):
        _close(_weights(root, [(str(tmp_path / "m.safetensors"), 1.0)]), _weights(root, [(a, 0.5), (b, -1.0)]), 1e-6)


def test_resize_diffusers_file(flux, tmp_path):
    d, n = flux
    peft_file(d, tmp_path, seed=2, r=4)
    src = str(tmp_path / "pytorch_lora_weights.safetensors")
    resize_file(src, tmp_path / "r4.safetensors", 4)
    _native_names(tmp_path / "r4.safetensors")
    _close(_weights(n, [(str(tmp_path / "r4.safetensors"), 1.0)]), _weights(n, [(src, 1.0)]), 1e-5)
    resize_file(src, tmp_path / "r2.safetensors", 2)
    lf = load_lora(tmp_path / "r2.safetensors")
    assert lf.modules["lora_unet_double_blocks_0_img_attn_qkv"].adapter.rank == 6  # q, k, v at rank 2, stacked


@pytest.mark.parametrize("tree", ["native", "diffusers"])
def test_extract_from_two_checkpoints(flux, tmp_path, tree):
    d, n = flux
    nshapes = shapes_of(n)
    mods = ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.txt_mlp.0", "img_in"]
    lora = write(native_lora(nshapes, 4, mods, r=2, alpha=2.0), tmp_path / "l.safetensors")
    root = n if tree == "native" else d
    base = {k: v.clone().contiguous() for k, v in root.state_dict().items()}
    tuned = _weights(root, [(lora, 1.0)])
    write(base, tmp_path / "base.safetensors")
    write(tuned, tmp_path / "tuned.safetensors")
    res = extract_file(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                       tmp_path / "x.safetensors", rank=4)
    names = _native_names(tmp_path / "x.safetensors")
    assert names == {"lora_unet_" + m.replace(".", "_") for m in mods}
    assert res.metadata["ss_base_model_version"] == "flux1"
    _close(_weights(n, [(str(tmp_path / "x.safetensors"), 1.0)]), _weights(n, [(lora, 1.0)]), 1e-5)
