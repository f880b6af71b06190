"""Names written by real third-party writers resolve, on every host naming, to the layer the
writer wrapped: LyCORIS's kohya network (diffusers block names, ``lora_te_``/``lora_te1_``/``lora_te2_``,
norms, convs, time embedding), PEFT on the diffusers UNet and text encoders (dotted paths, read
through ``formats.keys``), diffusers' PEFT->kohya converter, and ComfyUI-native ``diffusion_model.*``."""
from __future__ import annotations

import pytest
import torch

from lora_engine.formats.keys import canonical_module, parse_key, te_prefix_for
from lora_engine.keymap import build_keymap
from tests.keymap.test_coverage import HOSTS, host_state
from tests.fixtures.models.hosts import shapes
from tests.fixtures.models.tiny_sd import TinySD

PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"]
unet_target_name = ["conv_in", "conv_out", "conv_norm_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
PEFT_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
             "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
PEFT_TE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _weight_of(state, target):
    w = state[target.weight_key]
    return w if target.rows is None else w[target.rows[0]:target.rows[1]]


def _canon(name: str) -> str:
    """The reader's canonical spelling (``formats.keys``), with lora_te1_ folded into lora_te_."""
    name = canonical_module(name, "lora_te_").name
    return "lora_te_" + name[len("lora_te1_"):] if name.startswith("lora_te1_") else name


def _check(names_and_weights, model) -> int:
    """Each (name, dotted, expected weight) resolves on every host to a weight equal to the writer's layer."""
    checked = 0
    for host in HOSTS:
        state = host_state(model, host)
        km = build_keymap(shapes(state))
        for name, dotted, weight in names_and_weights:
            if name.endswith("text_projection") and host.startswith("a1111"):
                continue  # OpenCLIP stores it transposed; not mappable (documented in families.openclip)
            target = km.lookup(name, dotted)
            assert target is not None, f"{name} ({dotted}) unmapped on {host}: {km.diagnose([name])}"
            assert torch.equal(_weight_of(state, target), weight), f"{name} on {host}"
            checked += 1
    return checked


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_lycoris_kohya_names(tiny_models, tmp_path, arch):
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    preset = tmp_path / "preset.toml"
    preset.write_text(PRESET)
    model = TinySD.build(arch)
    te = model.text_encoders if arch == "sdxl" else model.text_encoders[0]
    net = lycoris_kohya.create_network(1.0, 2, 1.0, None, te, model.unet, preset=str(preset),
                                       train_norm=True, conv_dim=2)
    loras = list(net.unet_loras) + list(net.text_encoder_loras)
    assert any(lora.lora_name.startswith("lora_te2_") for lora in loras) == (arch == "sdxl")
    cases = [(lora.lora_name, None, lora.org_module[0].weight) for lora in loras]
    assert len(cases) > 100
    assert _check(cases, tiny_models[arch]) == len(cases) * len(HOSTS)


def _peft_names(arch):
    """(canonical name, dotted, weight) for a PEFT LoRA on every UNet/TE linear and conv, via formats.keys."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = TinySD.build(arch)
    parts = {"unet": (model.unet, PEFT_UNET)}
    for i, te in enumerate(model.text_encoders):
        parts["text_encoder" if i == 0 else "text_encoder_2"] = (te, PEFT_TE)
    keys, weights = [], {}
    for part, (module, targets) in parts.items():
        originals = {n: m.weight for n, m in module.named_modules() if hasattr(m, "weight")}
        inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), module)
        for key in get_peft_model_state_dict(module):
            keys.append(f"{part}.{key}")
            path = key.rsplit(".lora_", 1)[0]
            weights[f"{part}.{path}"] = originals[path]
    prefix = te_prefix_for(keys)
    out = []
    for key in keys:
        module_key, role = parse_key(key, prefix)
        if role == "down":
            out.append((module_key.name, module_key.dotted, weights[key.rsplit(".lora_", 1)[0]]))
    return out, keys


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_peft_dotted_names(tiny_models, arch):
    pytest.importorskip("peft")
    cases, _ = _peft_names(arch)
    assert len(cases) > 50 and all(d is not None for _, d, _ in cases)
    _check(cases, tiny_models[arch])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_kohya_converter_names(tiny_models, arch):
    """diffusers' ``convert_state_dict_to_kohya`` writes kohya names with diffusers block names, also for SDXL."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    cases, keys = _peft_names(arch)
    weight_by_name = {_canon(n): w for n, _, w in cases}
    converted = sorted({k.split(".")[0] for k in convert_state_dict_to_kohya({k: torch.zeros(1) for k in keys})})
    assert sorted(map(_canon, converted)) == sorted(weight_by_name)
    # The converter's raw names (flat transformers-5 TE paths) resolve as written, without the reader.
    _check([(n, None, weight_by_name[_canon(n)]) for n in converted], tiny_models[arch])


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_comfy_native_names(tiny_models, arch):
    """ComfyUI's own trainer/extractor keys: ``diffusion_model.<ldm path>.lora_up.weight``."""
    from tests.fixtures.models.hosts import comfy_unet_state_dict

    state = comfy_unet_state_dict(tiny_models[arch])
    cases = []
    for key, weight in state.items():
        if key.endswith(".weight"):
            module_key, role = parse_key(key[: -len(".weight")] + ".lora_up.weight", "lora_te_")
            assert role == "up"
            cases.append((module_key.name, module_key.dotted, weight))
    assert _check(cases, tiny_models[arch]) == len(cases) * len(HOSTS)
