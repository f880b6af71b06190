"""The real SD1.5 / SD2.x / SDXL-base module trees (built on the meta device: no storage): every layer
maps under every name in every host naming, the ldm view matches diffusers' converter, and the
kohya default target counts are the ones sd-scripts' ``create_modules`` gets (UNet 192 / 192 / 722 and text
encoders 72 / 138 / 72 + 192 modules for SD1 / SD2 / SDXL)."""
from __future__ import annotations

import pytest

from lora_engine.keymap import build_keymap
from tests.keymap.test_coverage import HOSTS, _cases, host_state
from tests.fixtures.models.full_sd import build_full
from tests.fixtures.models.hosts import shapes
from tests.fixtures.models.ldm_view import ldm_unet_view
from tests.fixtures.models.tiny_sd import ARCHS

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

# (UNet Linear/Conv in Transformer2DModel, CLIP attention+MLP linears per encoder), sd-scripts defaults.
KOHYA_COUNTS = {"sd1": (192, (72,)), "sd2": (192, (138,)), "sdxl": (722, (72, 192))}


@pytest.fixture(scope="module")
def full_models():
    return {arch: build_full(arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_full_ldm_view_matches_converter(full_models, arch):
    unet = full_models[arch].unet
    ldm = {"model.diffusion_model." + k: v for k, v in ldm_unet_view(unet).state_dict().items()}
    got = single_file.convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    want = unet.state_dict()
    assert set(got) == set(want)
    assert all(got[k].shape == want[k].shape for k in want)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_full_every_layer_maps(full_models, arch, host):
    model = full_models[arch]
    state = host_state(model, host)
    km = build_keymap(shapes(state))
    assert km.architecture == arch and km.ambiguous == []
    copied = tuple(p for p, n in zip(km.te_prefixes, km.te_namings) if n == "openclip")
    seen = set()
    for module, names in _cases(model, openclip_te2=host.startswith("a1111")):
        targets = {km.lookup(n, d) for n, d in names}
        assert len(targets) == 1 and None not in targets, names[0][0]
        target = targets.pop()
        assert target.shape == tuple(module.weight.shape), names[0][0]
        if not target.weight_key.startswith(copied):
            assert state[target.weight_key] is module.weight, names[0][0]
        assert (target.weight_key, target.rows) not in seen
        seen.add((target.weight_key, target.rows))


@pytest.mark.parametrize("arch", ARCHS)
def test_kohya_default_targets(full_models, arch):
    """sd-scripts' default modules (Linear/Conv under Transformer2DModel; CLIP attention/MLP linears)
    all resolve under the spelling kohya writes for the family: diffusers names for SD1/SD2, sgm for SDXL."""
    from torch import nn

    model = full_models[arch]
    km = build_keymap(shapes(host_state(model, "a1111")))
    unet_names = []
    ldm_paths = {id(m): p for p, m in ldm_unet_view(model.unet).named_modules()}
    for path, block in model.unet.named_modules():
        if type(block).__name__ == "Transformer2DModel":
            for sub, layer in block.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    kohya_path = ldm_paths[id(layer)] if arch == "sdxl" else f"{path}.{sub}"
                    unet_names.append("lora_unet_" + kohya_path.replace(".", "_"))
    want_unet, want_te = KOHYA_COUNTS[arch]
    assert len(unet_names) == want_unet
    assert all(km.lookup(n) is not None for n in unet_names)
    for te, prefix, want in zip(model.text_encoders, ("lora_te1_", "lora_te2_"), want_te):
        names = [f"{prefix}text_model_{p.replace('.', '_')}" for p, m in te.named_modules()
                 if isinstance(m, nn.Linear) and (".self_attn." in p or ".mlp." in p)]
        names = [n.replace("text_model_text_model_", "text_model_") for n in names]
        assert len(names) == want
        assert all(km.lookup(n) is not None for n in names), prefix
