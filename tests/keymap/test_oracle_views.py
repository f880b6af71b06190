"""The ldm/sgm views and the OpenCLIP tower carry the real names: diffusers' own converters
(ldm -> diffusers) turn their state dicts back into the diffusers/transformers state dicts exactly."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.models.hosts import a1111_root, nested_clip
from tests.fixtures.models.ldm_view import ldm_unet_view
from tests.fixtures.models.openclip import OpenCLIPText
from tests.fixtures.models.tiny_sd import ARCHS

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")


def _assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("arch", ARCHS)
def test_ldm_view_converts_back_to_diffusers(tiny_models, arch):
    unet = tiny_models[arch].unet
    ldm = {"model.diffusion_model." + k: v for k, v in ldm_unet_view(unet).state_dict().items()}
    converted = single_file.convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    _assert_same_state(converted, unet.state_dict())


@pytest.mark.parametrize("arch,index,prefix", [("sd2", 0, "cond_stage_model.model."),
                                               ("sdxl", 1, "conditioner.embedders.1.model.")])
def test_openclip_converts_back_to_hf(tiny_models, arch, index, prefix):
    te = tiny_models[arch].text_encoders[index]
    root = a1111_root(tiny_models[arch])
    ldm = {k: v for k, v in root.state_dict().items() if k.startswith(prefix)}
    converted = single_file.convert_open_clip_checkpoint(te, ldm, prefix=prefix)
    _assert_same_state(converted, nested_clip(te).state_dict())


@pytest.mark.parametrize("arch,index", [("sd2", 0), ("sdxl", 1)])
def test_openclip_forward_matches_hf(tiny_models, arch, index):
    te = tiny_models[arch].text_encoders[index]
    tower = OpenCLIPText.from_hf(te)
    tokens = torch.randint(0, te.config.vocab_size, (2, te.config.max_position_embeddings),
                           generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = te(tokens).last_hidden_state
        got = tower(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ldm_view_shares_layers_with_diffusers(tiny_models):
    unet = tiny_models["sd1"].unet
    view = ldm_unet_view(unet)
    assert view.input_blocks[1][0].in_layers[2] is unet.down_blocks[0].resnets[0].conv1
    assert view.out[2] is unet.conv_out
