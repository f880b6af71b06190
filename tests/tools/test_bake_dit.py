"""bake on Flux.1 and SD3: single-file checkpoints in BFL/original naming (bare, and ComfyUI's full
checkpoint with ``model.diffusion_model.`` + ``text_encoders.{clip_l,t5xxl}.transformer.`` + VAE) and diffusers
folders with a sharded ``transformer/`` (index json). Oracle: the engine's merged weights on a module tree
with the same keys (``MergedPatcher``: one fp32 sum, one cast), compared bit for bit; every other tensor's
bytes equal the input's; the baked diffusers folder loads in diffusers."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine.engine import LoraEngine
from lora_engine.formats import load_lora
from lora_engine.patch import StackEntry
from lora_engine.tools.bake import BakeLora, bake
from tests.fixtures.files.flux import flux_modules, native_lora, peft_file, write
from tests.fixtures.models.flux import TINY_SD3, NativeTree, flux_model, native_state, sd3_model

pytest.importorskip("diffusers")
pytest.importorskip("peft")

VAE_KEY = "vae.decoder.conv_in.weight"


def _engine_merged(state: dict, loras: list[BakeLora]) -> dict[str, torch.Tensor]:
    """The engine's merged weights on a module tree holding ``state`` under the same keys, for the stack
    bake builds (the same LoRA ids: terms are summed in id order)."""
    root = NativeTree(state)
    engine = LoraEngine.for_model(root, mode="merged")
    engine.set_stack([StackEntry(load_lora(l.path), te=l.te, unet=l.unet, key=f"{i}:{l.path}") for i, l in enumerate(loras)])
    return {k: v.clone() for k, v in root.state_dict().items()}


def _check_file(out: str, src_state: dict, want: dict) -> int:
    got = load_file(out)
    assert set(got) == set(src_state)
    changed = 0
    for k, v in got.items():
        assert v.dtype == src_state[k].dtype, k
        if k in want and not torch.equal(want[k], src_state[k]):
            assert torch.equal(v, want[k]), f"{k}: not the engine's merged weight"
            changed += 1
        else:
            assert torch.equal(v, src_state[k]), f"{k}: changed"
    return changed


def _te_lora(prefix: str, module: str, width: int, g) -> dict:
    key = prefix + module.replace(".", "_")
    return {key + ".lora_down.weight": torch.randn(2, width, generator=g) * 0.1,
            key + ".lora_up.weight": torch.randn(width, 2, generator=g) * 0.1, key + ".alpha": torch.tensor(1.0)}


def _comfy_flux_checkpoint(dtype) -> dict:
    """A ComfyUI full Flux checkpoint: BFL transformer, CLIP-L and T5 as ComfyUI names them, a VAE tensor."""
    from tests.fixtures.models.dit_pipelines import clip, t5

    state = {"model.diffusion_model." + k: v for k, v in native_state(flux_model(seed=2)).items()}
    state |= {"text_encoders.clip_l.transformer." + k: v for k, v in clip(3).state_dict().items()}
    state |= {"text_encoders.t5xxl.transformer." + k: v for k, v in t5(4).state_dict().items()}
    state[VAE_KEY] = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    return {k: v.detach().to(dtype).clone() for k, v in state.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_comfy_full_flux_checkpoint_kohya_and_diffusers_loras(tmp_path, dtype):
    state = _comfy_flux_checkpoint(dtype)
    src = tmp_path / "flux.safetensors"
    save_file(state, str(src), {"format": "pt"})
    nshapes = {k[len("model.diffusion_model."):]: tuple(v.shape) for k, v in state.items()
               if k.startswith("model.diffusion_model.")}
    g = torch.Generator().manual_seed(9)
    kohya = native_lora(nshapes, 3, flux_modules(nshapes), r=4, alpha=2.0)
    clip_q = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.weight"))
    clip_path = clip_q[len("text_encoders.clip_l.transformer."):-len(".weight")]
    kohya |= _te_lora("lora_te1_", ("" if clip_path.startswith("text_model.") else "text_model.") + clip_path, 32, g)
    kohya |= _te_lora("lora_te3_", "encoder.block.1.layer.0.SelfAttention.q", 32, g)
    peft_file(flux_model(seed=2), tmp_path, seed=4)  # split to_q/to_k/to_v/proj_mlp onto the fused weights
    loras = [BakeLora(write(kohya, tmp_path / "k.safetensors"), te=0.8, unet=0.6),
             BakeLora(str(tmp_path / "pytorch_lora_weights.safetensors"), unet=-0.5)]
    seen = []
    res = bake(src, loras, tmp_path / "out.safetensors", progress=lambda d, t, w: seen.append((d, t)))
    assert res.warnings == []
    want = _engine_merged(state, loras)
    changed = _check_file(str(tmp_path / "out.safetensors"), state, want)
    assert changed == res.touched and changed > len(flux_modules(nshapes))
    assert seen[-1] == (len(state), len(state))
    for k in (clip_q.replace("q_proj", "q_proj"), "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.q.weight",
              "model.diffusion_model.single_blocks.0.linear1.weight"):
        assert not torch.equal(load_file(str(tmp_path / "out.safetensors"))[k], state[k]), k


def test_bare_bfl_and_sd3_files(tmp_path):
    flux = {k: v.to(torch.bfloat16).contiguous() for k, v in native_state(flux_model(seed=1)).items()}
    sd3 = {k: v.contiguous() for k, v in native_state(sd3_model(TINY_SD3, seed=1), "sd3").items()}
    for name, state in (("flux", flux), ("sd3", sd3)):
        src = write(state, tmp_path / f"{name}.safetensors")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        mods = [k[:-7] for k in shapes if k.endswith(".weight") and len(shapes[k]) == 2 and "norm" not in k][::2]
        lora = BakeLora(write(native_lora(shapes, 5, mods), tmp_path / f"{name}_lora.safetensors"))
        res = bake(src, [lora], tmp_path / f"{name}_out.safetensors")
        assert res.touched == len(mods) and res.warnings == []
        assert _check_file(str(tmp_path / f"{name}_out.safetensors"), state, _engine_merged(state, [lora])) == len(mods)


def test_diffusers_folder_with_sharded_transformer(tmp_path):
    from diffusers import FluxPipeline

    from lora_engine.apps.generate import pipeline_root
    from tests.fixtures.models.dit_pipelines import flux_pipeline

    pipe = flux_pipeline(str(tmp_path))
    model = tmp_path / "model"
    pipe.transformer.save_pretrained(str(model / "transformer"), max_shard_size="40KB")
    for f in os.listdir(model / "transformer"):
        if f == "diffusion_pytorch_model.safetensors":
            os.remove(model / "transformer" / f)
    shards = sorted(f for f in os.listdir(model / "transformer") if f.endswith(".safetensors"))
    assert len(shards) > 2 and os.path.exists(model / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    peft_file(pipe.transformer, tmp_path, seed=6)
    nshapes = {k: tuple(v.shape) for k, v in native_state(pipe.transformer).items()}
    kohya = native_lora(nshapes, 7, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1"])
    loras = [BakeLora(str(tmp_path / "pytorch_lora_weights.safetensors"), unet=0.7),
             BakeLora(write(kohya, tmp_path / "k.safetensors"))]
    res = bake(model, loras, tmp_path / "baked")
    assert res.warnings == []

    root = pipeline_root(pipe)
    state = {k: v.detach().clone() for k, v in root.state_dict().items()}
    want = _engine_merged(state, loras)
    got = {}
    for f in shards:
        got |= {"transformer." + k: v for k, v in load_file(str(tmp_path / "baked" / "transformer" / f)).items()}
    assert set(got) == {k for k in state if k.startswith("transformer.")}
    changed = [k for k in got if not torch.equal(got[k], state[k])]
    bad = [(k, (got[k] - want[k]).abs().max().item()) for k in got if not torch.equal(got[k], want[k])]
    assert changed and not bad, bad
    assert len(changed) == res.touched
    with open(tmp_path / "baked" / "transformer" / "diffusion_pytorch_model.safetensors.index.json") as fh:
        index = json.load(fh)["weight_map"]
    assert all(k[len("transformer."):] in index for k in got)
    baked = FluxPipeline.from_pretrained(str(tmp_path / "baked"), local_files_only=True)
    assert all(torch.equal(v, want["transformer." + k]) for k, v in baked.transformer.state_dict().items())


def test_cli_bakes_a_flux_file(tmp_path, capsys):
    from lora_engine.apps.cli import main

    state = {k: v.contiguous() for k, v in native_state(flux_model(seed=1)).items()}
    src = write(state, tmp_path / "flux.safetensors")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    lora = write(native_lora(shapes, 5, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"]),
                 tmp_path / "l.safetensors")
    out = str(tmp_path / "out.safetensors")
    assert main(["bake", src, "--lora", f"{lora}:0.8", "-o", out, "--quiet"]) == 0
    assert "2 tensors changed" in capsys.readouterr().out
    want = _engine_merged(state, [BakeLora(lora, 0.8, 0.8)])
    assert _check_file(out, state, want) == 2
    assert main(["bake", src, "--lora", lora, "-o", out]) == 1  # an existing output needs --overwrite
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
