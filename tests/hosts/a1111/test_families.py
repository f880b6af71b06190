"""SD2 (OpenCLIP text encoder, fused ``in_proj_weight``) and SDXL (two text encoders, sgm names) as A1111
holds them (with the hijack's ``.wrapped`` level): merged weights through the extra network equal
W + m·ΔW on the right rows; on the fly gives the same text-encoder output without writing."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.hosts.a1111.conftest import make_network
from tests.hosts.a1111.standin import ExtraNetworkParams
from tests.fixtures.models.hosts import a1111_root
from tests.fixtures.models.tiny_sd import TinySD

CASES = {  # arch: (kohya name, path of the OpenCLIP attention in A1111's model, row block of q/k/v)
    "sd2": ("lora_te_text_model_encoder_layers_1_self_attn_k_proj", "cond_stage_model.wrapped.model", 1),
    "sdxl": ("lora_te2_text_model_encoder_layers_0_self_attn_v_proj", "conditioner.embedders.1.wrapped.model", 2),
}


class P:
    """The StableDiffusionProcessing fields read when A1111 activates without prompts (e.g. get_empty_cond)."""

    def __init__(self, sd_model):
        self.sd_model = sd_model
        self.extra_generation_params, self.comments = {}, {}

    def comment(self, text):
        self.comments[text] = 1


@pytest.mark.parametrize("arch,dtype", [("sd2", torch.float32), ("sdxl", torch.float32), ("sd2", torch.float16)])
def test_fused_openclip_rows(arch, dtype, tmp_path):
    """fp16 is A1111's default (weights in fp16, deltas summed in fp32, one cast on write)."""
    name, te_path, block = CASES[arch]
    tiny = TinySD.build(arch)
    model = a1111_root(tiny, wrapped=True).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    attn = model.get_submodule(te_path).transformer.resblocks[int(name.split("layers_")[1][0])].attn
    h = attn.embed_dim
    g = torch.Generator().manual_seed(7)
    down, up = torch.randn(2, h, generator=g) * 0.3, torch.randn(h, 2, generator=g) * 0.3
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
              str(tmp_path / "t.safetensors"))
    w0 = attn.in_proj_weight.detach().clone()
    x = torch.randn(1, 3, h, generator=g).to(dtype)
    y0 = attn(x, x, x, need_weights=False)[0]

    c, net = make_network(tmp_path, lora_engine_mode="merged")
    net.activate(P(model), [ExtraNetworkParams(["t", "0.75"])])
    want = w0.to(torch.float32, copy=True)
    want[block * h:(block + 1) * h] += 0.75 * (up @ down)
    # W = cast(W0 + Σ m·ΔW): summed in fp32 (the GEMM's order may differ from this formula's in the last
    # fp32 bit), then one rounding to the weight's dtype: within half an ulp of the dtype
    ulp = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -10
    torch.testing.assert_close(attn.in_proj_weight.float(), want, rtol=ulp, atol=1e-7)
    if dtype == torch.float16:  # A1111's merge: up/down cast to fp16 at load, ΔW = m·s·(up@down) and the add in fp16
        exact = w0.to(torch.float32, copy=True)
        exact[block * h:(block + 1) * h] += 0.75 * (up @ down)
        a1111 = w0.clone()
        a1111[block * h:(block + 1) * h] += (up.half() @ down.half()) * torch.tensor(1.0, dtype=dtype) * 0.75
        ours_err = (attn.in_proj_weight.float() - exact).abs().max()
        assert ours_err <= (a1111.float() - exact).abs().max()  # one rounding vs three
    y_merged = attn(x, x, x, need_weights=False)[0]
    assert (y_merged - y0).abs().max() > 1e-3

    c.opts.values["lora_engine_mode"] = "on the fly"
    net.activate(P(model), [ExtraNetworkParams(["t", "0.75"])])
    assert torch.equal(attn.in_proj_weight, w0)  # restored bit-exactly, nothing written on the fly
    torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], y_merged, rtol=0, atol=10 * tol)
    net.activate(P(model), [])
    torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], y0, rtol=0, atol=0)


def test_sdxl_cond_stage_model_alias_is_one_pair_of_encoders(tmp_path, caplog):
    """A1111's hijack sets ``sd_model.cond_stage_model = sd_model.conditioner`` for SDXL (seen in a real
    A1111 1.10.1: the state dict then lists both encoders twice). One pair is mapped, no warning, and a
    LoRA on the second encoder writes its rows once and restores exactly."""
    import logging

    from lora_engine.engine import shapes_of
    from lora_engine.keymap import build_keymap

    name, te_path, block = CASES["sdxl"]
    model = a1111_root(TinySD.build("sdxl"), wrapped=True)
    model.cond_stage_model = model.conditioner
    assert any(k.startswith("cond_stage_model.") for k in model.state_dict())  # the alias is really there
    with caplog.at_level(logging.WARNING, logger="lora_engine"):
        keymap = build_keymap(shapes_of(model))
    assert not [r for r in caplog.records if "text encoders" in r.getMessage()], caplog.text
    assert keymap.lookup(name) is not None and keymap.lookup("lora_te1_text_model_encoder_layers_0_mlp_fc1")
    attn = model.get_submodule(te_path).transformer.resblocks[0].attn
    h = attn.embed_dim
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(2, h, generator=g), torch.randn(h, 2, generator=g)
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
              str(tmp_path / "t.safetensors"))
    w0 = attn.in_proj_weight.detach().clone()
    c, net = make_network(tmp_path, lora_engine_mode="merged")
    net.activate(P(model), [ExtraNetworkParams(["t", "0.5"])])
    want = w0.clone()
    want[block * h:(block + 1) * h] += 0.5 * (up @ down)
    torch.testing.assert_close(attn.in_proj_weight, want, rtol=2.0 ** -23, atol=1e-7)
    net.activate(P(model), [])
    assert torch.equal(attn.in_proj_weight, w0)
