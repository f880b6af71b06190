"""merge and resize on files written by lycoris-lora and peft.

Oracles: each input adapter's own ΔW (the core math, itself checked against lycoris/peft forwards),
summed with the weights; singular values from ``torch.linalg.svdvals`` in float64, independent of the
tool's ``torch.linalg.svd`` in fp32. Tolerances: fp32 products of rank ≤ 12 over ≤ 576 terms:
rtol 1e-5 / atol 1e-6·max|ΔW| for exact results; squared-error vs discarded energy within
1e-4·‖ΔW‖²_F (fp32 SVD round-off), while a wrong rank or scale is off by ≥ 1e-2·‖ΔW‖².
"""
from __future__ import annotations

import threading

import pytest
import torch

from lora_engine.errors import OperationCancelled, ToolError
from lora_engine.formats import load_lora
from lora_engine.library.hashes import hash_file
from lora_engine.tools.merge import MergeInput, merge_files, merge_loras
from lora_engine.tools.resize import resize_file, resize_lora
from tests.fixtures.files.writers import deltas, energy_after, fro2, lycoris_file, peft_folder

WEIGHTS = (0.7, -1.3, 0.5)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    return [
        lycoris_file(d / "locon.safetensors", seed=1),
        peft_folder(d / "peft", seed=2, r=3, lora_alpha=6, target_modules=["to_q", "to_k", "conv1"]),
        lycoris_file(d / "tucker.safetensors", seed=3, use_tucker=True, linear_dim=2, linear_alpha=1.0),
    ]


def _expected(paths, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for p, w in zip(paths, weights):
        for name, d in deltas(load_lora(p)).items():
            total[name] = w * d if name not in total else total[name] + w * d.reshape(total[name].shape)
    return total


def test_merge_exact_is_the_weighted_sum(three, tmp_path):
    out = tmp_path / "merged.safetensors"
    merge_files(list(zip(three, WEIGHTS)), out, dtype=torch.float32)
    got, want = deltas(load_lora(out)), _expected(three, WEIGHTS)
    assert set(got) == set(want)
    shared = 0
    for name, w in want.items():
        g = got[name].reshape(w.shape)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()), msg=name)
    lf_in = [load_lora(p) for p in three]
    for name, ma in load_lora(out).modules.items():
        ranks = [lf.modules[name].adapter.rank for lf in lf_in if name in lf.modules]
        assert ma.adapter.rank == sum(ranks) and ma.adapter.scale == 1.0, name
        shared += len(ranks) >= 2
    assert shared >= 10  # the three files overlap on many modules (test is not trivially additive)


def test_merge_exact_metadata_and_hashes(three, tmp_path):
    out = tmp_path / "m.safetensors"
    res = merge_files(list(zip(three[:2], WEIGHTS)), out)
    meta = load_lora(out).metadata
    assert meta["sshs_model_hash"] == hash_file(out).addnet  # data-region hash, as sd-scripts computes it
    assert meta["sshs_legacy_hash"] == hash_file(out).legacy == "e3b0c442"  # < 1 MiB
    assert meta["ss_network_dim"] == "Dynamic"  # ranks 4+3 and 4 differ per module
    assert res.metadata == meta


@pytest.mark.parametrize("rank", [1, 3])
def test_svd_merge_error_is_discarded_energy(three, rank):
    inputs = [MergeInput(load_lora(p), w) for p, w in zip(three, WEIGHTS)]
    res = merge_loras(inputs, rank=rank, dtype=torch.float32)
    want = _expected(three, WEIGHTS)
    reports = {r.name: r for r in res.reports}
    for name, w in want.items():
        m = res.modules[name]
        got = (m.up.reshape(m.up.shape[0], -1) @ m.down.reshape(m.rank, -1)) * (m.alpha / m.rank)
        err2 = fro2(got.reshape(w.shape) - w)
        disc = energy_after(w, rank)
        assert abs(err2 - disc) <= 1e-4 * fro2(w), (name, err2, disc)
        assert reports[name].retained_fro == pytest.approx((1 - disc / fro2(w)) ** 0.5, abs=1e-5)


def test_merge_refuses_base_dependent_types(tmp_path):
    dora = load_lora(lycoris_file(tmp_path / "dora.safetensors", seed=4, dora_wd=True))
    with pytest.raises(ToolError, match="dora"):
        merge_loras([MergeInput(dora, 1.0)], rank=2)


def test_merge_cancel(three):
    ev = threading.Event()
    seen = []

    def progress(done, total, what):
        seen.append(done)
        if done == 3:
            ev.set()

    with pytest.raises(OperationCancelled):
        merge_loras([MergeInput(load_lora(three[0]), 1.0)], progress=progress, cancel=ev)
    assert seen == [1, 2, 3]


def test_resize_fixed_error_and_scale(three, tmp_path):
    src = load_lora(three[0])
    out = tmp_path / "r2.safetensors"
    res = resize_file(three[0], out, 2)
    got = load_lora(out)
    want, have = deltas(src), deltas(got)
    assert got.metadata["ss_network_dim"] == "2" and got.metadata["sshs_model_hash"] == hash_file(out).addnet
    for rep in res.reports:
        w, g = want[rep.name], have[rep.name]
        disc = energy_after(w, 2)
        assert abs(fro2(g.reshape(w.shape) - w) - disc) <= 1e-4 * fro2(w), rep.name
        assert rep.retained_fro == pytest.approx((1 - disc / fro2(w)) ** 0.5, abs=1e-5)
        assert got.modules[rep.name].adapter.scale == pytest.approx(src.modules[rep.name].adapter.scale)
        assert disc > 1e-3 * fro2(w)  # rank 4 -> 2 really discards something


def test_resize_to_full_rank_is_lossless(three):
    src = load_lora(three[2])  # Tucker convs and linears
    res = resize_lora(src, 64, dtype=torch.float32)
    for name, w in deltas(src).items():
        m = res.modules[name]
        got = (m.up.reshape(m.up.shape[0], -1) @ m.down.reshape(m.rank, -1)) * (m.alpha / m.rank)
        torch.testing.assert_close(got.reshape(w.shape), w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


def _k_fro(s, p):
    c = (s.pow(2).cumsum(0) / s.pow(2).sum()).sqrt()
    return int((c < p - 1e-12).sum()) + 1


def _k_cum(s, p):
    c = s.cumsum(0) / s.sum()
    return int((c < p - 1e-12).sum()) + 1


@pytest.mark.parametrize("method,param,oracle", [
    ("sv_fro", 0.9, _k_fro), ("sv_cumulative", 0.7, _k_cum),
    ("sv_ratio", 3.0, lambda s, p: int((s > s[0] / p).sum())),
])
def test_resize_dynamic_rank_choice(three, method, param, oracle):
    src = load_lora(three[0])
    res = resize_lora(src, 16, method=method, param=param)
    ks, want = set(), deltas(src)
    for rep in res.reports:
        w = want[rep.name]
        s = torch.linalg.svdvals(w.double().reshape(w.shape[0], -1))
        assert rep.new_rank == max(1, min(oracle(s, param), 16)), (rep.name, rep.new_rank)
        ks.add(rep.new_rank)
    assert len(ks) > 1  # dynamic: ranks differ across modules
    assert "Dynamic" in {resize_lora_meta(res)}


def resize_lora_meta(res):
    from lora_engine.formats.writer import network_metadata
    return network_metadata(res.modules)["ss_network_dim"]


def test_svd_merge_of_lycoris_types_uses_their_dense_delta(tmp_path, three):
    """LoHa (rank(ΔW) up to r², not concatenable) + LoCon: SVD merge error = discarded energy."""
    loha = lycoris_file(tmp_path / "loha.safetensors", seed=12, algo="loha", linear_dim=2, conv_dim=2)
    paths, weights = [loha, three[0]], (1.5, -0.5)
    res = merge_loras([MergeInput(load_lora(p), w) for p, w in zip(paths, weights)], rank=3, dtype=torch.float32)
    want = _expected(paths, weights)
    with pytest.raises(ToolError, match="loha"):
        merge_loras([MergeInput(load_lora(loha), 1.0)])
    for name, w in want.items():
        m = res.modules[name]
        got = (m.up.reshape(m.up.shape[0], -1) @ m.down.reshape(m.rank, -1)).reshape(w.shape)
        assert abs(fro2(got - w) - energy_after(w, 3)) <= 1e-4 * fro2(w), name


def test_te_names_unified_across_sd1_and_sdxl_spellings():
    from lora_engine.tools.naming import unify_te_names

    a, b = unify_te_names([["lora_te_text_model_x", "lora_unet_y"], ["lora_te1_text_model_x", "lora_te2_z"]])
    assert a["lora_te_text_model_x"] == b["lora_te1_text_model_x"] == "lora_te1_text_model_x"
    (c,) = unify_te_names([["lora_te1_text_model_x"]])
    assert c["lora_te1_text_model_x"] == "lora_te_text_model_x"
