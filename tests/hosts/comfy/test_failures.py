"""What ComfyUI sees when a LoRA cannot be applied: an adapter whose math fails, or whose result is not
finite, never raises into ComfyUI's model loading (which runs inside sampling); the weight stays as
ComfyUI passed it and one warning line names the LoRA. A LoRA made for another model family applies
nothing, with the core's one-line diagnosis."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from comfy_nodes.loader import LoraEngineLoader, LoraEngineLoaderModelOnly
from tests.fixtures.files.comfy import kohya_lora
from tests.hosts.comfy.helpers import patched_state

PROJECTIONS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("lora_engine")]


def _write(path, m, tensors_for) -> None:
    sd = {}
    for dotted in PROJECTIONS:
        w = m.unet.get_submodule(dotted).weight
        name = "lora_unet_" + dotted.replace(".", "_")
        sd |= {f"{name}.{k}": v for k, v in tensors_for(*w.shape).items()}
    save_file(sd, str(path))


def test_failing_math_keeps_comfyuis_weight_with_one_warning(loras, sd1, caplog):
    model, _, m = sd1
    # LoHa factors that load and fit by shape, but (o, r, 1) @ (r, i) fails inside the math
    _write(loras / "bad.safetensors", m, lambda o, i: {
        "hada_w1_a": torch.randn(o, 2, 1), "hada_w1_b": torch.randn(2, i), "hada_w2_a": torch.randn(o, 2),
        "hada_w2_b": torch.randn(2, i), "alpha": torch.tensor(2.0)})
    base = {k: v.detach().clone() for k, v in model.model_state_dict().items()}
    new_model = LoraEngineLoaderModelOnly().load(model, "bad.safetensors", 1.0)[0]
    assert len(new_model.patches) == len(PROJECTIONS)
    got = patched_state(new_model)  # ComfyUI's load: does not raise
    assert all(torch.equal(v, base[k]) for k, v in got.items())
    (line,) = _warnings(caplog)
    assert "bad.safetensors" in line and "cannot be applied" in line and "ComfyUI's weight was kept" in line
    patched_state(new_model)  # loaded again (next prompt): no second line for the same patches
    assert len(_warnings(caplog)) == 1


def test_non_finite_result_keeps_comfyuis_weight(loras, sd1, caplog):
    model, _, m = sd1
    _write(loras / "huge.safetensors", m, lambda o, i: {
        "lora_down.weight": torch.full((2, i), 1e30), "lora_up.weight": torch.full((o, 2), 1e30),
        "alpha": torch.tensor(2.0)})
    base = {k: v.detach().clone() for k, v in model.model_state_dict().items()}
    got = patched_state(LoraEngineLoaderModelOnly().load(model, "huge.safetensors", 1.0)[0])
    assert all(torch.equal(v, base[k]) for k, v in got.items())
    (line,) = _warnings(caplog)
    assert "huge.safetensors" in line and "not finite" in line


def test_lora_for_another_family_applies_nothing(loras, sd1, caplog):
    """An SD1 LoRA carrying SDXL second-encoder keys is an SDXL LoRA to the diagnosis: nothing of it is
    patched, and the one warning line says why."""
    model, clip, m = sd1
    kohya_lora(loras / "k.safetensors", m)
    sd = load_file(str(loras / "k.safetensors"))
    extra = {k.replace("lora_te_", "lora_te2_", 1): v.clone() for k, v in sd.items() if k.startswith("lora_te_")}
    save_file(sd | extra, str(loras / "xl.safetensors"))
    new_model, new_clip = LoraEngineLoader().load(model, clip, "xl.safetensors", 1.0, 1.0)
    (line,) = _warnings(caplog)
    assert line.startswith("lora-engine: xl: ") and "SDXL LoRA on an SD1.x model" in line
    assert "nothing of it was applied" in line
    assert new_model is model and new_clip is clip
