"""On-the-fly mode: same outputs as merged for every adapter type, weights untouched,
runtime factors (scalar and per-sample) without re-patching."""
from __future__ import annotations

import pytest
import torch

from lora_engine.library.parsed import LoraCache
from lora_engine.engine import LoraEngine, Mode
from lora_engine.patch import StackEntry
from tests.patch.conftest import make_host
from tests.fixtures.files.kohya import write_kohya
from tests.fixtures.files.lycoris import ALGOS, write_lycoris


def _unet_out(m, batch: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    cfg = m.unet.config
    x = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return m.unet(x, torch.tensor([10] * batch), ctx).sample


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_onthefly_equals_merged(tmp_path, algo):
    m, root, km = make_host("sd1", "diffusers")
    path = tmp_path / f"{algo}.safetensors"
    write_lycoris(path, "sd1", algo)
    lf = LoraCache().get(path)
    before = {k: v.clone() for k, v in root.state_dict().items()}
    base = _unet_out(m)
    eng = LoraEngine(root, km, Mode.MERGED)
    plan = eng.set_stack([StackEntry(lf, unet=0.8)])
    assert not plan.reports[lf.path].unmatched
    merged = _unet_out(m)
    eng.set_mode(Mode.ONTHEFLY)  # restores, then hooks
    for k, v in root.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights untouched
    fly = _unet_out(m)
    assert (merged - base).abs().max() > 1e-3  # the LoRA does something
    # fp32 throughout; merged adds ΔW into W before the matmul, on-the-fly adds ΔW·x after it:
    # the difference is summation order only (relative ~1e-6).
    torch.testing.assert_close(fly, merged, rtol=1e-4, atol=1e-5)
    eng.restore()
    torch.testing.assert_close(_unet_out(m), base, rtol=0, atol=0)


def test_fused_openclip_onthefly_equals_merged(tmp_path):
    """SD2 in A1111 naming: q/k/v LoRAs land in rows of nn.MultiheadAttention.in_proj_weight."""
    m, root, km = make_host("sd2", "a1111")
    write_kohya(tmp_path / "te.safetensors", km, seed=4, fraction=1.0, component="te")
    lf = LoraCache().get(tmp_path / "te.safetensors")
    te = root.cond_stage_model.model
    tokens = torch.tensor([[1, 5, 9, 3, 2]])
    with torch.no_grad():
        base = te(tokens)
    eng = LoraEngine(root, km, Mode.MERGED)
    eng.set_stack([StackEntry(lf, te=-0.7)])
    with torch.no_grad():
        merged = te(tokens)
    eng.set_mode(Mode.ONTHEFLY)
    with torch.no_grad():
        fly = te(tokens)
    assert (merged - base).abs().max() > 1e-3
    torch.testing.assert_close(fly, merged, rtol=1e-4, atol=1e-5)
    eng.restore()
    with torch.no_grad():
        assert torch.equal(te(tokens), base)


def test_runtime_factor_and_per_sample(tmp_path):
    m, root, km = make_host("sd1", "diffusers")
    write_kohya(tmp_path / "a.safetensors", km, seed=5, fraction=0.7, component="unet")
    write_kohya(tmp_path / "b.safetensors", km, seed=6, fraction=0.7, component="unet")
    cache = LoraCache()
    a, b = cache.get(tmp_path / "a.safetensors"), cache.get(tmp_path / "b.safetensors")
    eng = LoraEngine(root, km, Mode.ONTHEFLY)
    eng.set_stack([StackEntry(a), StackEntry(b)])
    hooks = len(eng._patcher.hooks)

    def run_with(fa, fb):
        eng.set_factor(a.path, fa)
        eng.set_factor(b.path, fb)
        return _unet_out(m, batch=2)

    # separate runs: image 0 with (a=1, b=0), image 1 with (a=-0.5, b=1)
    sep0 = run_with(1.0, 0.0)[0]
    sep1 = run_with(-0.5, 1.0)[1]
    both = run_with(torch.tensor([1.0, -0.5]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(both[0], sep0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1], sep1, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both[0], both[1])
    # factor 0 for both equals the base model
    eng.set_factor(a.path, 0.0)
    eng.set_factor(b.path, 0.0)
    off = _unet_out(m)
    eng.restore()
    torch.testing.assert_close(off, _unet_out(m), rtol=0, atol=0)
    assert hooks > 0


def test_per_sample_factors_are_prepared_once_per_change_not_per_layer(tmp_path, monkeypatch):
    """A per-sample factor vector is converted to the layers' device/dtype once per ``set_factor`` and each
    side path builds its ρ once per change (on a GPU every host-to-device copy waits for the queue, so a
    copy per hooked layer per step would stall the sampler)."""
    from lora_engine.patch.lowrank_side import FusedLowRank

    m, root, km = make_host("sd1", "diffusers")
    write_kohya(tmp_path / "a.safetensors", km, seed=5, fraction=0.7, component="unet")
    a = LoraCache().get(tmp_path / "a.safetensors")
    eng = LoraEngine(root, km, Mode.ONTHEFLY)
    eng.set_stack([StackEntry(a)])
    built, converted = [], []
    real_scales = FusedLowRank._sample_scales
    monkeypatch.setattr(FusedLowRank, "_sample_scales", lambda self, f, h: built.append(self) or real_scales(self, f, h))
    real_to = torch.Tensor.to

    def counting_to(t, *args, **kwargs):
        if t.dtype == torch.float64:
            converted.append(1)
        return real_to(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    eng.set_factor(a.path, torch.tensor([1.0, -0.5], dtype=torch.float64))  # host vector, other dtype
    first = _unet_out(m, batch=2)
    n_modules, n_conv = len(set(map(id, built))), len(converted)
    assert n_modules == len(built) > 10 and n_conv == 1  # one conversion, one ρ per side path
    second = _unet_out(m, batch=2)
    assert len(built) == n_modules and len(converted) == 1 and torch.equal(first, second)
    eng.set_factor(a.path, torch.tensor([0.0, 1.0], dtype=torch.float64))
    third = _unet_out(m, batch=2)
    assert len(built) == 2 * n_modules and len(converted) == 2
    assert not torch.allclose(first, third)
    eng.restore()


def test_suspend_and_resume_keep_the_built_side_paths(tmp_path):
    """``suspend`` takes every hook off (the plain model runs), ``resume`` puts them back with the same terms
    and side paths (a host that attaches LoRAs per run pays nothing to re-attach); ``apply`` while suspended
    hooks nothing until ``resume``."""
    from lora_engine.patch import OnTheFlyPatcher, build_plan

    m, root, km = make_host("sd1", "diffusers")
    write_lycoris(tmp_path / "lora.safetensors", "sd1", "locon")
    lf = LoraCache().get(tmp_path / "lora.safetensors")
    base = _unet_out(m)
    runner = OnTheFlyPatcher(root)
    runner.apply(build_plan([StackEntry(lf, unet=0.8)], km))
    fly = _unet_out(m)
    built = {(p, k): v[0] for p, h in runner.hooks.items() for k, v in h.fused_cache.items()}
    assert len(built) > 10 and (fly - base).abs().max() > 1e-3
    runner.suspend()
    torch.testing.assert_close(_unet_out(m), base, rtol=0, atol=0)
    runner.apply(build_plan([StackEntry(lf, unet=0.8)], km))  # same plan: nothing changes, still off
    torch.testing.assert_close(_unet_out(m), base, rtol=0, atol=0)
    runner.resume()
    torch.testing.assert_close(_unet_out(m), fly, rtol=0, atol=0)
    assert all(runner.hooks[p].fused_cache[k][0] is v for (p, k), v in built.items())
    runner.restore()
    torch.testing.assert_close(_unet_out(m), base, rtol=0, atol=0)
