"""Shared oracle for files written by peft / diffusers: the writer's own injected LoRA layers.

``compare_with_peft_layers`` walks every PEFT ``LoraLayer`` of a model and checks that the base
layer run with our ``W + ΔW`` (and ``b + Δb``) gives the same output as PEFT's own forward.
"""
from __future__ import annotations

import torch

from tests.oracle_models import module_output, sample_input, tiny_clip, tiny_unet

# fp32 on both sides, different summation order: rtol 1e-4, atol 1e-5 relative to the output's largest entry.
RTOL, ATOL = 1e-4, 1e-5
UNET_LINEARS = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_CONVS = ["conv1", "conv2", "conv_shortcut"]
TE_LINEARS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def lora_layers(model: torch.nn.Module):
    """(dotted path without PEFT's wrapper prefix, PEFT LoraLayer) for every injected layer."""
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and isinstance(mod.get_base_layer(), (torch.nn.Linear, torch.nn.Conv2d)):
            yield model_path(name), mod


def model_path(name: str) -> str:
    """A module name inside a PEFT-wrapped model -> its path in the original diffusers/transformers model."""
    dotted = name.removeprefix("base_model.model.")
    if dotted.startswith("encoder.layers."):  # transformers 5's CLIPTextModel has no "text_model." level;
        dotted = "text_model." + dotted        # kohya names (and so our dotted paths) keep it
    return dotted


def randomize(model: torch.nn.Module, seed: int, magnitude: bool = True) -> None:
    """Random, non-zero lora_A/lora_B (and bias); DoRA magnitudes scaled by random factors in [0.5, 1.5],
    so DoRA differs from plain LoRA (PEFT initialises the magnitude to ‖W + s·BA‖, which would hide it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for key in layer.lora_A:
                for p in (layer.lora_A[key].weight, layer.lora_B[key].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                if layer.lora_B[key].bias is not None:
                    layer.lora_B[key].bias.copy_(torch.randn(layer.lora_B[key].bias.shape, generator=g) * 0.3)
            if magnitude and hasattr(layer, "lora_magnitude_vector"):
                for key, mag in layer.lora_magnitude_vector.items():
                    mag.weight.mul_(0.5 + torch.rand(mag.weight.shape, generator=g))


def by_dotted(lf, prefixes: tuple[str, ...]) -> dict:
    """Our modules whose canonical name starts with one of ``prefixes``, keyed by dotted path."""
    out = {}
    for m in lf.modules.values():
        if m.name.startswith(prefixes):
            assert m.dotted is not None, m.name
            out[m.dotted] = m
    return out


def compare_with_peft_layers(model, ours: dict, *, min_layers: int = 4, what: str = "") -> int:
    """Check every injected layer of ``model`` against our module of the same dotted path.
    Returns the number of layers checked; each must change the output (non-trivial)."""
    checked = 0
    for dotted, layer in lora_layers(model):
        assert dotted in ours, f"{what}: no module read for {dotted}"
        base = layer.get_base_layer()
        x = sample_input(base)
        with torch.no_grad():
            expected = layer(x)
            before = base(x)
            d = ours[dotted].adapter.delta(base.weight)
            b = base.bias
            if d.bias is not None:
                b = (torch.zeros(base.weight.shape[0]) if b is None else b) + d.bias
            got = module_output(base, base.weight + d.weight, x, b)
        assert (expected - before).abs().max() > 1e-3, f"{what} {dotted}: adapter does nothing (test is blind)"
        atol = ATOL * max(1.0, float(expected.abs().max()))  # fp32 sums of up to i·k·k terms
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what} {dotted}: {m}")
        checked += 1
    assert checked >= min_layers, (what, checked)
    assert checked == len(ours), f"{what}: read {len(ours)} modules, model has {checked} adapted layers"
    return checked


def adapted_models(seed: int, unet_cfg: dict, te_cfg: dict, te2_cfg: dict | None = None, cross_dim: int = 32) -> dict:
    """Real models with PEFT layers injected the way diffusers' training scripts do (``unet.add_adapter``;
    for CLIP, peft's ``inject_adapter_in_model``, which transformers' ``add_adapter`` wraps), randomised."""
    from peft import LoraConfig, inject_adapter_in_model

    unet = tiny_unet(seed=seed, cross_dim=cross_dim)
    unet.add_adapter(LoraConfig(init_lora_weights=False, **unet_cfg))
    models = {"unet": unet}
    models["text_encoder"] = inject_adapter_in_model(LoraConfig(init_lora_weights=False, **te_cfg), tiny_clip(seed + 1))
    if te2_cfg:
        te2 = tiny_clip(seed + 2, with_projection=True)
        models["text_encoder_2"] = inject_adapter_in_model(LoraConfig(init_lora_weights=False, **te2_cfg), te2)
    for i, m in enumerate(models.values()):
        randomize(m, seed * 10 + i)
    return models
