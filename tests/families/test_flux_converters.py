"""Flux LoRA files at Flux.1-dev's real width, read by diffusers' own converters (which hard-code the
3072-wide ``linear1`` split) and by the engine's key map on the full-size tree (meta device): every
diffusers layer receives the same ΔW (compared through ΔW·P for a random probe P: the dense 12288×3072
products are not needed). No model weights are needed: only the LoRA's own tensors."""
from __future__ import annotations

import pytest
import torch

from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch.plan import resolve
from tests.fixtures.files.flux import native_lora, write
from tests.fixtures.models.flux import FLUX_DEV, flux_model, native_state

pytest.importorskip("diffusers")

MODULES = ["single_blocks.0.linear1", "single_blocks.37.linear2", "double_blocks.3.img_attn.qkv",
           "double_blocks.18.txt_attn.qkv", "double_blocks.0.img_mod.lin"]


@pytest.fixture(scope="module")
def full():
    model = flux_model(FLUX_DEV, meta=True)
    dshapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    nshapes = {k: tuple(v.shape) for k, v in native_state(model).items()}
    return dshapes, nshapes


_PROBES: dict[int, torch.Tensor] = {}


def _probe(width: int) -> torch.Tensor:
    if width not in _PROBES:
        _PROBES[width] = torch.randn(width, 3, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    return _PROBES[width]


def _ours(path, dshapes) -> dict[str, torch.Tensor]:
    """ΔW·P per diffusers weight from the engine's resolution of the file on the full diffusers tree."""
    km = build_keymap(dshapes)
    out: dict[str, torch.Tensor] = {}
    for name, ma, target, why in resolve(load_lora(path), km):
        assert target is not None and why is None, (name, why)
        a = ma.adapter
        assert tuple(a.natural_shape()) == target.shape, name
        d = a.scale * (a.up.double() @ (a.down.double() @ _probe(a.down.shape[1])))
        out[target.weight_key] = out.get(target.weight_key, 0) + d
    return out


def _theirs(path) -> dict[str, torch.Tensor]:
    from diffusers import FluxPipeline

    sd = FluxPipeline.lora_state_dict(str(path))
    out = {}
    for k in sd:
        if k.endswith("lora_A.weight"):
            module = k[: -len(".lora_A.weight")].removeprefix("transformer.")
            a, b = sd[k].double(), sd[k.replace("lora_A", "lora_B")].double()
            out[module + ".weight"] = b @ (a @ _probe(a.shape[1]))
    return out


@pytest.mark.parametrize("spelling", ["kohya", "comfyui"])
def test_full_width_split_matches_diffusers(full, tmp_path, spelling):
    dshapes, nshapes = full
    path = write(native_lora(nshapes, 3, MODULES, r=4, alpha=2.0, spelling=spelling), tmp_path / "f.safetensors")
    ours, theirs = _ours(path, dshapes), _theirs(path)
    assert set(ours) == set(theirs) and len(ours) == 4 + 1 + 3 + 3 + 1
    for k in theirs:
        assert torch.allclose(ours[k], theirs[k], atol=1e-9), k
