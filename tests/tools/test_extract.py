"""extract: a LoRA from two ldm/sgm single-file checkpoints, checked by applying it (bake) to the base.

Oracle: the perturbations the test added itself. Low-rank perturbations (rank 2, extracted at rank 4)
must come back to fp32 rounding (rtol 1e-4 / atol 1e-6 relative to the weight scale); full-rank
perturbations at rank k must leave exactly the discarded energy Σ_{j>k} S_j² (torch.linalg.svdvals,
float64) within 1e-4·‖ΔW‖².
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine.errors import ToolError
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.tools.bake import BakeLora, bake
from lora_engine.tools.extract import extract_file, extract_lora
from tests.fixtures.models.hosts import a1111_root
from tests.fixtures.models.tiny_sd import TinySD
from tests.fixtures.files.writers import energy_after, fro2


def _checkpoints(tmp_path, arch: str, low_rank: bool, every: int = 4):
    state = {k: v.detach().clone().contiguous() for k, v in a1111_root(TinySD.build(arch)).state_dict().items()}
    keymap = build_keymap({k: tuple(v.shape) for k, v in state.items()})
    tuned = {k: v.clone() for k, v in state.items()}
    g = torch.Generator().manual_seed(9)
    changed = {}
    targets = [t for t in dict.fromkeys(keymap.lookup(n) for n in sorted(keymap.names())) if len(t.shape) in (2, 4)]
    for i, t in enumerate(targets):
        if i % every:
            continue
        o, n = t.shape[0], int(torch.Size(t.shape[1:]).numel())
        d = (torch.randn(o, 2, generator=g) @ torch.randn(2, n, generator=g)) * 0.05 if low_rank \
            else torch.randn(o, n, generator=g) * 0.05
        region = tuned[t.weight_key] if t.rows is None else tuned[t.weight_key][t.rows[0]:t.rows[1]]
        region += d.reshape(region.shape)
        changed[(t.weight_key, t.rows)] = d.reshape(t.shape)
    save_file(state, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return state, tuned, keymap, changed


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_extract_low_rank_difference_is_exact(tmp_path, arch):
    state, tuned, keymap, changed = _checkpoints(tmp_path, arch, low_rank=True)
    out = tmp_path / "lora.safetensors"
    res = extract_file(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), out, 4)
    assert len(res.modules) == len(changed) and all(r.rank == 4 for r in res.reports)
    if arch == "sd2":
        assert any(rows for _, rows in changed), "no fused q/k/v slice among the perturbed targets"
    names = set(load_lora(out).modules)
    assert any(n.startswith("lora_unet_down_blocks_") for n in names) and any(n.startswith("lora_te_") for n in names)
    bake(tmp_path / "base.safetensors", [BakeLora(str(out))], tmp_path / "applied.safetensors")
    applied = load_file(str(tmp_path / "applied.safetensors"))
    touched = {k for k, _ in changed}
    for k, v in tuned.items():
        if k in touched:
            torch.testing.assert_close(applied[k], v, rtol=1e-4, atol=1e-6 * max(1.0, float(v.abs().max())), msg=k)
        else:
            assert torch.equal(applied[k], state[k]), k


def test_extract_full_rank_error_is_discarded_energy(tmp_path):
    state, tuned, keymap, changed = _checkpoints(tmp_path, "sd1", low_rank=False, every=6)
    res = extract_lora(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), 3, conv_rank=5,
                       dtype=torch.float32)
    by_name = {n: keymap.lookup(n) for n in res.modules}
    for rep in res.reports:
        t = by_name[rep.name]
        d = changed[(t.weight_key, t.rows)]
        m = res.modules[rep.name]
        got = m.up.reshape(m.up.shape[0], -1) @ m.down.reshape(m.rank, -1)
        k = 5 if len(t.shape) == 4 and t.shape[2] > 1 else 3
        assert m.rank == min(k, *d.reshape(d.shape[0], -1).shape), rep.name
        disc = energy_after(d, m.rank)
        assert abs(fro2(got.reshape(d.shape) - d) - disc) <= 1e-4 * fro2(d), rep.name
        assert rep.retained_fro == pytest.approx((1 - disc / fro2(d)) ** 0.5, abs=1e-5)


def test_extract_sdxl_names_and_min_diff(tmp_path):
    _, _, _, changed = _checkpoints(tmp_path, "sdxl", low_rank=True, every=5)
    res = extract_lora(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), 2)
    names = list(res.modules)
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    unet = [n for n in names if n.startswith("lora_unet_")]
    assert unet and not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block"))
                            for n in unet)  # sgm names, as sd-scripts writes SDXL
    with pytest.raises(ToolError, match="no targeted weight differs"):
        extract_lora(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), 2, min_diff=10.0)


def test_extract_from_diffusers_folders(tmp_path):
    """Two diffusers folders (unet/ + text_encoder/ written by save_pretrained): the tuned one differs by
    rank-1 changes in one UNet and one text-encoder layer; rank 1 recovers them to fp32 rounding."""
    m = TinySD.build("sd1")
    m.unet.save_pretrained(str(tmp_path / "base" / "unet"))
    m.text_encoders[0].save_pretrained(str(tmp_path / "base" / "text_encoder"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        q = m.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.weight
        dq = torch.randn(q.shape[0], 1, generator=g) @ torch.randn(1, q.shape[1], generator=g) * 0.05
        q += dq
        fc = m.text_encoders[0].get_submodule("encoder.layers.1.mlp.fc1").weight
        dfc = torch.randn(fc.shape[0], 1, generator=g) @ torch.randn(1, fc.shape[1], generator=g) * 0.05
        fc += dfc
    m.unet.save_pretrained(str(tmp_path / "tuned" / "unet"))
    m.text_encoders[0].save_pretrained(str(tmp_path / "tuned" / "text_encoder"))
    res = extract_lora(str(tmp_path / "base"), str(tmp_path / "tuned"), 1, dtype=torch.float32)
    want = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": dq,
            "lora_te_text_model_encoder_layers_1_mlp_fc1": dfc}
    assert set(res.modules) == set(want)
    for name, d in want.items():
        mod = res.modules[name]
        torch.testing.assert_close(mod.up @ mod.down, d, rtol=1e-4, atol=1e-6)
