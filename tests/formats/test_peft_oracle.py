"""Files written by peft 0.21.2 on real UNet2DConditionModel / CLIPTextModel(WithProjection) modules, read
by lora-engine: our ΔW (and Δb) must reproduce PEFT's own layer forward, and PEFT's merge_and_unload.

Oracles: (1) each PEFT ``LoraLayer``'s forward vs the base layer run with ``W + ΔW``; (2) the weights
after PEFT's ``merge_and_unload()`` minus the original weights.
Tolerance: rtol 1e-4 / atol 1e-5·max|y| in fp32 (forward) and rtol 1e-5 / atol 1e-6 (merged weights): both
sides compute in fp32 but in different orders (PEFT's DoRA forward rescales the base output
instead of forming the merged weight), so bitwise equality is not expected; a wrong α/r, √r, pattern,
DoRA axis or conv layout gives errors of order 1e-2 or more.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lora_engine.formats import load_lora
from tests.fixtures.files.peft_oracle import (TE_LINEARS, UNET_CONVS, UNET_LINEARS, by_dotted, compare_with_peft_layers,
                                       model_path, randomize)
from tests.fixtures.models.oracle import tiny_clip, tiny_unet

UNET_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=UNET_LINEARS + UNET_CONVS),
    "alpha-eq-r": dict(r=4, lora_alpha=4, target_modules=UNET_LINEARS),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=UNET_LINEARS + UNET_CONVS),
    "patterns": dict(r=4, lora_alpha=8, target_modules=UNET_LINEARS + UNET_CONVS,
                     rank_pattern={"to_q": 2, "conv1": 6}, alpha_pattern={"to_k": 3, "down_blocks.0.resnets.0.conv2": 5}),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=UNET_LINEARS + UNET_CONVS),
    "lora-bias": dict(r=4, lora_alpha=2, lora_bias=True, target_modules=["to_out.0", "conv1", "conv2", "proj_in", "proj_out"]),
}


def _peft_folder(tmp_path, model, case: dict, seed: int):
    from peft import LoraConfig, get_peft_model

    base = {model_path(n): (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **case))
    randomize(pm, seed)
    folder = tmp_path / "adapter"
    pm.save_pretrained(str(folder))
    return pm, folder, base


def _check_merge(pm, ours: dict, base: dict, what: str) -> None:
    """PEFT's merge_and_unload: merged − original weight (and bias) equals our Δ."""
    merged = {model_path(n): m for n, m in copy.deepcopy(pm).merge_and_unload().named_modules()}
    for dotted, ma in ours.items():
        w0, b0 = base[dotted]
        d = ma.adapter.delta(w0)
        torch.testing.assert_close(merged[dotted].weight.detach() - w0, d.weight, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what} merged {dotted}: {m}")
        if d.bias is not None:
            torch.testing.assert_close(merged[dotted].bias.detach() - b0, d.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(UNET_CASES))
def test_peft_folder_unet(tmp_path, case):
    pm, folder, base = _peft_folder(tmp_path, tiny_unet(seed=0), UNET_CASES[case], seed=11)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    lf = load_lora(folder)
    assert lf.format == "peft"
    assert not lf.problems and not lf.unknown_keys, (lf.problems, lf.unknown_keys[:5])
    ours = by_dotted(lf, ("lora_unet_",))
    assert all(k.startswith("lora_unet_") for k in lf.modules)
    n = compare_with_peft_layers(pm, ours, min_layers=8, what=case)
    if "conv1" in UNET_CASES[case]["target_modules"]:
        downs = [getattr(m.adapter, "inner", m.adapter).down for m in ours.values()]
        assert any(d.ndim == 4 and d.shape[-1] == 3 for d in downs), "no LoCon-style 3×3 lora_A was exercised"
    if case == "dora":
        kinds = {m.kind for m in ours.values()}
        assert kinds == {"dora"}, kinds
        shapes = {tuple(m.adapter.magnitude.shape) for m in ours.values()}
        assert any(len(s) == 1 for s in shapes) and any(len(s) == 4 and s[0] == 1 for s in shapes), shapes
    if case == "lora-bias":
        assert all(m.adapter.up_bias is not None for m in ours.values())
    _check_merge(pm, ours, base, case)
    assert n == len(lf.modules)


@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_peft_folder_text_encoder(tmp_path, with_projection, dora):
    targets = TE_LINEARS + (["text_projection"] if with_projection else [])
    case = dict(r=4, lora_alpha=3, use_dora=dora, target_modules=targets)
    pm, folder, base = _peft_folder(tmp_path, tiny_clip(seed=1, with_projection=with_projection), case, seed=12)
    lf = load_lora(folder)
    assert not lf.problems and not lf.unknown_keys, (lf.problems, lf.unknown_keys[:5])
    ours = by_dotted(lf, ("lora_te_",))
    assert len(ours) == len(lf.modules)
    compare_with_peft_layers(pm, ours, min_layers=12, what=f"te proj={with_projection} dora={dora}")
    if with_projection:
        assert "lora_te_text_projection" in lf.modules
    _check_merge(pm, ours, base, "te")


def test_raw_peft_state_dict_without_prefix(tmp_path):
    """get_peft_model_state_dict of a model adapted in place (diffusers' ``add_adapter`` / transformers'
    ``add_adapter``): bare module paths, no ``base_model.model.``, no config. With lora_alpha = r the
    file needs no α (a missing α means α = r)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    unet, te = tiny_unet(seed=2), tiny_clip(seed=3)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=UNET_LINEARS + UNET_CONVS))
    # transformers 5's add_adapter wants peft ≥ 0.22; it is a thin wrapper over peft's inject_adapter_in_model
    te = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=TE_LINEARS), te)
    randomize(unet, 5)
    randomize(te, 6)
    for model, prefix in ((unet, "lora_unet_"), (te, "lora_te_")):
        sd = get_peft_model_state_dict(model)
        assert not any(k.startswith(("base_model.", "unet.", "text_encoder.")) for k in sd)
        path = tmp_path / f"{prefix}raw.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        lf = load_lora(path)
        assert not lf.problems and not lf.unknown_keys, (lf.problems, lf.unknown_keys[:5])
        compare_with_peft_layers(model, by_dotted(lf, (prefix,)), what=f"raw {prefix}")


def test_diffusers_save_lora_adapter_metadata(tmp_path):
    """diffusers' ``unet.save_lora_adapter``: bare keys, and the LoraConfig (α ≠ r, patterns, rsLoRA)
    as *unprefixed* JSON in the ``lora_adapter_metadata`` header."""
    from peft import LoraConfig

    unet = tiny_unet(seed=4)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=7, use_rslora=True, init_lora_weights=False,
                                target_modules=UNET_LINEARS + UNET_CONVS, rank_pattern={"to_v": 2},
                                alpha_pattern={"to_out.0": 1.5}))
    randomize(unet, 8)
    unet.save_lora_adapter(str(tmp_path / "out"))
    files = list((tmp_path / "out").glob("*.safetensors"))
    assert len(files) == 1
    lf = load_lora(files[0])
    assert "lora_adapter_metadata" in lf.metadata
    assert not lf.problems and not lf.unknown_keys, (lf.problems, lf.unknown_keys[:5])
    compare_with_peft_layers(unet, by_dotted(lf, ("lora_unet_",)), min_layers=8, what="save_lora_adapter")
