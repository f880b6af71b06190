"""bake: single-file ldm/sgm checkpoints (SD1, SD2 with fused OpenCLIP q/k/v, SDXL) and diffusers folders.

Oracle: W' = cast(W₀ + Σ m·(α/r)·up@down) computed here from the random factors the test wrote
(independent of the adapters code), located through the key map; every other tensor's bytes must be
identical to the input file's. fp32 expected values agree to rounding of one add (rtol 1e-6);
fp16/bf16 outputs within one ulp of the stored dtype of that fp32 value (the sums are taken in a different order).
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine.errors import OperationCancelled, ToolError
from lora_engine.formats.safetensors_file import SafetensorsFile
from lora_engine.keymap import build_keymap
from lora_engine.tools.bake import BakeLora, bake
from tests.fixtures.models.hosts import a1111_root
from tests.fixtures.models.tiny_sd import TinySD

VAE_KEY = "first_stage_model.decoder.conv_in.weight"


def _ldm_checkpoint(path, arch: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone().to(dtype).contiguous() for k, v in a1111_root(TinySD.build(arch, seed)).state_dict().items()}
    state[VAE_KEY] = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(5)).to(dtype)
    save_file(state, str(path), {"format": "pt"})
    return state


def _kohya_lora(path, keymap, seed: int, every: int = 3) -> dict[str, tuple]:
    """A kohya-named LoRA on every ``every``-th distinct target (2-D/4-D weights); returns
    {name: (up, down, alpha)} so the test can compute ΔW itself."""
    g = torch.Generator().manual_seed(seed)
    chosen, seen = {}, set()
    for name in sorted(keymap.names()):
        t = keymap.lookup(name)
        key = (t.weight_key, t.rows)
        if key in seen or len(t.shape) not in (2, 4):
            continue
        seen.add(key)
        if len(seen) % every:
            continue
        o, rest = t.shape[0], t.shape[1:]
        r = 2 + len(chosen) % 3
        down = torch.randn(r, *rest, generator=g) * 0.3
        up = torch.randn(o, r, *([1, 1] if len(rest) == 3 else []), generator=g) * 0.3
        chosen[name] = (up, down, float(r + 1))
    sd = {}
    for name, (up, down, alpha) in chosen.items():
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return chosen


def _expected(state, keymap, loras: list[tuple[dict, float, float]]) -> dict[str, torch.Tensor]:
    acc: dict[str, torch.Tensor] = {}
    for chosen, te, unet in loras:
        for name, (up, down, alpha) in chosen.items():
            t = keymap.lookup(name)
            m = te if t.component == "te" else unet
            d = (alpha / down.shape[0]) * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
            w = acc.setdefault(t.weight_key, state[t.weight_key].float().clone())
            region = w if t.rows is None else w[t.rows[0]:t.rows[1]]
            region += m * d.reshape(region.shape)
    return acc  # fp32; the file holds cast(this)


def _raw(path, key) -> bytes:
    f = SafetensorsFile(path)
    ti = f.info[key]
    with open(path, "rb") as fh:
        fh.seek(ti.begin)
        return fh.read(ti.end - ti.begin)


@pytest.mark.parametrize("arch,dtype", [("sd1", torch.float32), ("sd1", torch.float16), ("sd2", torch.float32),
                                        ("sdxl", torch.bfloat16)])
def test_bake_single_file(tmp_path, arch, dtype):
    ckpt = tmp_path / "model.safetensors"
    state = _ldm_checkpoint(ckpt, arch, dtype)
    keymap = build_keymap({k: tuple(v.shape) for k, v in state.items()})
    a = _kohya_lora(tmp_path / "a.safetensors", keymap, seed=1, every=2)
    b = _kohya_lora(tmp_path / "b.safetensors", keymap, seed=2, every=3)
    out = tmp_path / "baked.safetensors"
    res = bake(ckpt, [BakeLora(str(tmp_path / "a.safetensors"), 0.8, -0.5),
                      BakeLora(str(tmp_path / "b.safetensors"), 1.2, 0.3)], out)
    want = _expected(state, keymap, [(a, 0.8, -0.5), (b, 1.2, 0.3)])
    got = load_file(str(out))
    assert set(got) == set(state) and res.touched == len(want) and res.copied == len(state) - len(want)
    if arch != "sd1":
        assert any(keymap.lookup(n).rows for n in a), "fused q/k/v slices not exercised"
    for k, v in state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        if k in want:
            # one rounding of the fp32 sum (summation order differs): within one ulp of the stored dtype
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(got[k].float(), want[k], rtol=eps, atol=1e-6, msg=k)
            assert not torch.equal(got[k], v), k
        else:
            assert _raw(out, k) == _raw(ckpt, k), k  # bit for bit
    meta = SafetensorsFile(out).metadata
    assert meta["format"] == "pt" and len(json.loads(meta["lora_engine_baked"])) == 2


def test_bake_is_atomic(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    state = _ldm_checkpoint(ckpt, "sd1", torch.float32)
    _kohya_lora(tmp_path / "a.safetensors", build_keymap({k: tuple(v.shape) for k, v in state.items()}), seed=1)
    out = tmp_path / "baked.safetensors"
    out.write_bytes(b"previous")

    def stop(done, total, what):
        if done == total // 2:
            raise OperationCancelled("user stop")

    with pytest.raises(OperationCancelled):
        bake(ckpt, [BakeLora(str(tmp_path / "a.safetensors"))], out, overwrite=True, progress=stop)
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "baked.safetensors", "model.safetensors"]


def test_bake_rejects_unmatched_lora(tmp_path):
    ckpt = tmp_path / "sd1.safetensors"
    _ldm_checkpoint(ckpt, "sd1", torch.float32)
    other = TinySD.build("sdxl")
    sdxl_map = build_keymap({k: tuple(v.shape) for k, v in a1111_root(other).state_dict().items()})
    names = [n for n in sdxl_map.names() if n.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1")]
    assert names
    _kohya_lora_subset(tmp_path / "x.safetensors", sdxl_map, names)
    with pytest.raises(ToolError, match="no LoRA module matched"):
        bake(ckpt, [BakeLora(str(tmp_path / "x.safetensors"))], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def _kohya_lora_subset(path, keymap, names):
    sd = {}
    for n in names:
        t = keymap.lookup(n)
        if len(t.shape) != 2:
            continue
        sd[f"{n}.lora_down.weight"] = torch.randn(2, t.shape[1])
        sd[f"{n}.lora_up.weight"] = torch.randn(t.shape[0], 2)
    save_file(sd, str(path))


def test_bake_diffusers_folder(tmp_path):
    m = TinySD.build("sdxl")
    src = tmp_path / "pipe"
    m.unet.save_pretrained(str(src / "unet"))
    for i, te in enumerate(m.text_encoders):
        te.save_pretrained(str(src / ("text_encoder" if i == 0 else "text_encoder_2")))
    (src / "model_index.json").write_text("{}")
    state = {}
    for comp, fname in [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                        ("text_encoder_2", "model.safetensors")]:
        state.update({f"{comp}.{k}": v for k, v in load_file(str(src / comp / fname)).items()})
    keymap = build_keymap({k: tuple(v.shape) for k, v in state.items()})
    a = _kohya_lora(tmp_path / "a.safetensors", keymap, seed=3, every=2)
    out = tmp_path / "baked"
    res = bake(src, [BakeLora(str(tmp_path / "a.safetensors"), 0.6, 1.1)], out)
    want = _expected(state, keymap, [(a, 0.6, 1.1)])
    assert {c for c in want if c.startswith("text_encoder_2.")} and {c for c in want if c.startswith("unet.")}
    got = {}
    for comp, fname in [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                        ("text_encoder_2", "model.safetensors")]:
        got.update({f"{comp}.{k}": v for k, v in load_file(str(out / comp / fname)).items()})
        assert (out / comp / "config.json").read_bytes() == (src / comp / "config.json").read_bytes()
    assert (out / "model_index.json").exists() and res.touched == len(want)
    for k, v in state.items():
        if k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
        else:
            assert torch.equal(got[k], v), k
    # diffusers loads the baked UNet
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    k0 = next(k for k in want if k.startswith("unet."))
    assert torch.equal(unet.state_dict()[k0[len("unet."):]], got[k0])


def test_bake_equals_engine_merge_bit_for_bit(tmp_path):
    """A LyCORIS DoRA file (delta depends on W₀) baked into a diffusers-named single file equals what
    the engine's merged patcher writes into the live model: both go through ``summed_delta``."""
    from lora_engine.engine import LoraEngine, shapes_of
    from lora_engine.formats import load_lora
    from lora_engine.patch import StackEntry
    from tests.fixtures.models.oracle import tiny_unet
    from tests.fixtures.files.writers import lycoris_file

    lora = lycoris_file(tmp_path / "dora.safetensors", seed=21, dora_wd=True, wd_on_output=True)
    unet = tiny_unet(seed=0).half()
    base = {"unet." + k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    save_file(base, str(tmp_path / "m.safetensors"))
    bake(tmp_path / "m.safetensors", [BakeLora(lora, 1.0, -0.7)], tmp_path / "o.safetensors")
    eng = LoraEngine(unet, build_keymap(shapes_of(unet)))
    eng.set_stack([StackEntry(load_lora(lora), te=1.0, unet=-0.7)])
    got = load_file(str(tmp_path / "o.safetensors"))
    changed = 0
    for k, v in unet.state_dict().items():
        assert torch.equal(got["unet." + k], v), k
        changed += not torch.equal(v, base["unet." + k])
    assert changed > 50


def _sdxl_lora_for(path) -> None:
    """A kohya LoRA on every 2-D/4-D target of the tiny SDXL model (some names and shapes also exist in SD1)."""
    sdxl_map = build_keymap({k: tuple(v.shape) for k, v in a1111_root(TinySD.build("sdxl")).state_dict().items()})
    _kohya_lora(path, sdxl_map, seed=4, every=1)


def test_bake_applies_nothing_of_a_lora_for_another_family_unless_forced(tmp_path):
    ckpt = tmp_path / "sd1.safetensors"
    state = _ldm_checkpoint(ckpt, "sd1", torch.float32)
    xl = tmp_path / "xl.safetensors"
    _sdxl_lora_for(xl)
    with pytest.raises(ToolError) as err:
        bake(ckpt, [BakeLora(str(xl))], tmp_path / "o.safetensors")
    line = str(err.value)
    assert "\n" not in line and "SDXL LoRA on an SD1.x model" in line and "nothing of it was applied" in line, line
    assert not (tmp_path / "o.safetensors").exists()
    # next to a LoRA for this model, the foreign one is left out and the other baked
    keymap = build_keymap({k: tuple(v.shape) for k, v in state.items()})
    own = _kohya_lora(tmp_path / "own.safetensors", keymap, seed=1, every=5)
    res = bake(ckpt, [BakeLora(str(xl)), BakeLora(str(tmp_path / "own.safetensors"))], tmp_path / "o.safetensors")
    assert res.touched == len(_expected(state, keymap, [(own, 1.0, 1.0)]))
    assert len(res.warnings) == 1 and "nothing of it was applied" in res.warnings[0]
    fitting = int(re.search(r"applies the (\d+) module\(s\) that fit", line).group(1))
    forced = bake(ckpt, [BakeLora(str(xl))], tmp_path / "f.safetensors", force=True)  # the CLI's --force
    got = load_file(str(tmp_path / "f.safetensors"))
    changed = [k for k, v in state.items() if not torch.equal(got[k], v)]
    assert forced.touched == len(changed) == fitting > 0
    (warning,) = forced.warnings
    assert "SDXL LoRA on an SD1.x model" in warning and "nothing of it was applied" not in warning


def test_bake_keeps_a_weight_whose_result_is_not_finite(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    state = _ldm_checkpoint(ckpt, "sd1", torch.float16)
    keymap = build_keymap({k: tuple(v.shape) for k, v in state.items()})
    chosen = _kohya_lora(tmp_path / "a.safetensors", keymap, seed=1, every=4)
    name = next(iter(chosen))
    sd = load_file(str(tmp_path / "a.safetensors"))
    sd[f"{name}.lora_up.weight"] = torch.full_like(sd[f"{name}.lora_up.weight"], 300.0)  # ΔW ~ 1e4·r: Inf in fp16
    sd[f"{name}.lora_down.weight"] = torch.full_like(sd[f"{name}.lora_down.weight"], 300.0)
    save_file(sd, str(tmp_path / "a.safetensors"))
    res = bake(ckpt, [BakeLora(str(tmp_path / "a.safetensors"))], tmp_path / "o.safetensors")
    key = keymap.lookup(name).weight_key
    (warning,) = res.warnings
    assert warning.startswith(key) and "would not be finite; kept as in the checkpoint" in warning
    got = load_file(str(tmp_path / "o.safetensors"))
    assert torch.equal(got[key], state[key]) and all(torch.isfinite(v).all() for v in got.values())
    assert sum(not torch.equal(got[k], v) for k, v in state.items()) == len(chosen) - 1
