"""Other adapter types on Flux, across the fused/split boundary: PEFT DoRA (per-output-row magnitude; diffusers
drops DoRA, so the oracle is peft's own merge of the writer's model), LyCORIS LoKr and full ``diff``/``diff_b``
on a fused ``qkv``/``linear1`` applied to the split model (= the same file on the native tree)."""
from __future__ import annotations

import copy

import pytest
import torch

from lora_engine.engine import shapes_of
from lora_engine.formats import load_lora
from tests.fixtures.files.flux import write
from tests.families.test_flux_apply import _close, _loaded, _merged
from tests.fixtures.models.flux import NativeTree, flux_model, native_state

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def models():
    d = flux_model(seed=5)
    return d, NativeTree(native_state(d))


def test_peft_dora_both_trees(models, tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    d, n = models
    torch.manual_seed(3)
    m = copy.deepcopy(d)
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "proj_mlp", "add_k_proj", "to_out.0"])
    inject_adapter_in_model(cfg, m)
    with torch.no_grad():  # a magnitude that is not the initial norm: DoRA's own effect shows
        for name, p in m.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(m),
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    for mod in m.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
    want = {k.replace(".base_layer", ""): v for k, v in m.state_dict().items() if "lora_" not in k}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert load_lora(path).modules["lora_unet_transformer_blocks_0_attn_to_q"].kind == "dora"
    got_d, rep = _merged(d, path)
    assert rep.unmatched == [] and rep.problems == []
    _close(got_d, want, "DoRA, diffusers tree")
    got_n, rep = _merged(n, path)
    assert rep.unmatched == []
    _close(got_n, native_state(_loaded(d, want)), "DoRA, native tree")


def _lokr_and_full(nshapes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    o, i = nshapes["double_blocks.0.img_attn.qkv.weight"]
    key = "lycoris_double_blocks_0_img_attn_qkv"
    out[key + ".lokr_w1"] = torch.randn(3, 2, generator=g)  # kron(w1 (3×2), w2 (o/3 × i/2))
    out[key + ".lokr_w2_a"] = torch.randn(o // 3, 2, generator=g) * 0.1
    out[key + ".lokr_w2_b"] = torch.randn(2, i // 2, generator=g) * 0.1
    out[key + ".alpha"] = torch.tensor(1.0)
    o, i = nshapes["single_blocks.0.linear1.weight"]
    key = "lycoris_single_blocks_0_linear1"
    out[key + ".diff"] = torch.randn(o, i, generator=g) * 0.01
    out[key + ".diff_b"] = torch.randn(o, generator=g) * 0.01
    return out


def test_lokr_and_diff_on_fused_layers_split(models, tmp_path):
    d, n = models
    path = write(_lokr_and_full(shapes_of(n), 6), tmp_path / "lyco.safetensors")
    lf = load_lora(path)
    assert sorted(m.kind for m in lf.modules.values()) == ["full", "lokr"]
    got_n, rep = _merged(n, path)
    assert rep.unmatched == []
    got_d, rep = _merged(d, path)
    assert rep.unmatched == [] and rep.problems == []
    _close(got_n, native_state(_loaded(d, got_d)), "native vs diffusers")
    assert not torch.equal(got_d["single_transformer_blocks.0.proj_mlp.bias"], d.state_dict()["single_transformer_blocks.0.proj_mlp.bias"])
