"""The Tools page's bake and extract on a diffusers folder of the demo architecture: bake equals
W + ΔW computed by hand, and extract recovers the (rank-4) LoRA delta from the two folders."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from lora_engine.apps.ui import tool_ops

pytest.importorskip("diffusers")
MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
PARAM = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture
def base_folder(tmp_path, demo_base):
    from lora_engine.apps.demo.model import load_model

    model = load_model(demo_base)
    folder = tmp_path / "models" / "base"  # in the context's model folder
    model.unet.save_pretrained(str(folder / "unet"))
    model.text_encoder.save_pretrained(str(folder / "text_encoder"))
    return str(folder)


def _delta(sd, name):
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    return float(sd[f"{name}.alpha"]) / down.shape[0] * (up @ down)


def test_bake_then_extract_through_the_ui_ops(ctx, lora_root, base_folder, tmp_path):
    calls = []
    baked = os.path.join(lora_root, "baked")  # written to the output folder
    text = tool_ops.bake_op(ctx, "base", "purple_style:1", "baked", progress=lambda d, t, w: calls.append((d, t)))
    assert text.startswith("wrote ") and "4 tensors changed" in text, text
    assert calls and calls[-1][0] == calls[-1][1]
    w0 = load_file(os.path.join(base_folder, "unet", "diffusion_pytorch_model.safetensors"))[PARAM]
    w1 = load_file(os.path.join(baked, "unet", "diffusion_pytorch_model.safetensors"))[PARAM]
    lora = load_file(os.path.join(lora_root, "purple_style.safetensors"))
    assert torch.allclose(w1, w0 + _delta(lora, MODULE), atol=1e-6)

    text = tool_ops.extract_op(ctx, "base", "baked", "extracted", 4)  # "baked" from the output folder
    assert text.startswith("wrote ") and "4 modules differ" in text, text
    got = load_file(os.path.join(lora_root, "extracted.safetensors"))
    name = next(k.split(".")[0] for k in got if k.endswith("lora_down.weight") and "attn2_to_k" in k
                and "down_blocks_0" in k)
    assert torch.allclose(_delta(got, name), _delta(lora, MODULE), atol=1e-4)


def test_bake_refuses_its_input_as_output(ctx, base_folder, lora_root):
    import dataclasses
    import shutil

    from lora_engine.apps.ui.context import UiContext

    shutil.copytree(base_folder, os.path.join(lora_root, "base2"))
    text = tool_ops.bake_op(ctx, "base2", "purple_style", "base2", overwrite=True)
    assert text.startswith("error: ") and "this server does not replace files" in text
    loose = UiContext(dataclasses.replace(ctx.config, allow_overwrite=True), library=ctx.library)
    text = tool_ops.bake_op(loose, "base2", "purple_style", "base2", overwrite=True)
    assert text.startswith("error: ") and "must differ" in text
