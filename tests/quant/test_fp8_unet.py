"""A1111's "FP8 weight" option / ComfyUI's fp8 ``weight_dtype`` on a tiny SD1 UNet: every Linear and Conv2d
stored in fp8 and cast at each call. A kohya LoRA (LoCon on the convolutions) on the fly gives each layer
the reference output within the layer's own rounding; merged rounds dequant(W₀) + ΔW to the nearest fp8
value (at least as close as ComfyUI's stochastic rounding); restore is bit-exact."""
from __future__ import annotations

import pytest
import torch

from lora_engine.engine import LoraEngine, Mode, shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from tests.fixtures.files.kohya import independent_delta, write_kohya
from tests.quant.conftest import comfy_stochastic_merge, same_bytes, stored_bytes

pytest.importorskip("diffusers")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_unet_on_the_fly_and_merged(tmp_path, dtype):
    from tests.fixtures.models.quantized import to_fp8
    from tests.fixtures.models.tiny_sd import tiny_unet

    unet = to_fp8(tiny_unet("sd1", seed=2), dtype)
    keymap = build_keymap(shapes_of(unet))
    truth = write_kohya(tmp_path / "l.safetensors", keymap, seed=4, rank=2, alpha=1.0, fraction=0.4)
    targets = {keymap.lookup(name).weight_key: t for name, t in truth.items()}
    assert any(unet.get_submodule(k.rpartition(".")[0]).weight.ndim == 4 for k in targets)  # convolutions too
    before = stored_bytes(unet)
    engine = LoraEngine.for_model(unet, mode="automatic")
    assert engine.mode is Mode.ONTHEFLY
    engine.set_stack([StackEntry(load_lora(str(tmp_path / "l.safetensors")), unet=0.9)])
    g = torch.Generator().manual_seed(1)
    for key, (down, up, alpha) in targets.items():
        layer = unet.get_submodule(key.rpartition(".")[0])
        w0 = layer.weight.float()
        b = None if layer.bias is None else layer.bias.double()
        ref_w = w0.double() + 0.9 * independent_delta(down, up, alpha, w0.shape)
        if w0.ndim == 2:
            x = torch.randn(3, w0.shape[1], generator=g)
            run = lambda w: torch.nn.functional.linear(x.double(), w, b)  # noqa: E731
        else:
            x = torch.randn(1, w0.shape[1], 6, 6, generator=g)
            run = lambda w: torch.nn.functional.conv2d(x.double(), w, b, layer.stride,  # noqa: E731
                                                       layer.padding)
        ref = run(ref_w)
        err = (layer(x).double() - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), (key, err)
    assert same_bytes(before, stored_bytes(unet)) == []
    engine.set_mode(Mode.MERGED)  # the opt-in: merged re-rounds to the nearest fp8 value
    for key, (down, up, alpha) in targets.items():
        layer = unet.get_submodule(key.rpartition(".")[0])
        w0 = before[key].view(dtype).reshape(layer.weight.shape).float()
        ref_w = w0.double() + 0.9 * independent_delta(down, up, alpha, w0.shape)
        got = layer.weight.double()
        comfy = comfy_stochastic_merge(ref_w, dtype, seed=3).double()
        assert bool(((got - ref_w).abs() <= (comfy - ref_w).abs() + 1e-9).all()), key
        assert (got - ref_w).abs().max() <= ref_w.abs().max() * 2.0 ** -(3 if dtype == torch.float8_e4m3fn else 2)
    engine.restore()
    assert same_bytes(before, stored_bytes(unet)) == []
