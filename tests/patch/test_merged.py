"""Merged mode on real tiny SD1/SD2/SDXL models in diffusers and A1111 (ldm/sgm) naming:
weights equal W + Σ m·ΔW computed independently; restore is bit-exact after many switches;
a switch touches only the slots whose delta changed."""
from __future__ import annotations

import random

import pytest
import torch

from lora_engine.library.parsed import LoraCache
from lora_engine.engine import LoraEngine, Mode
from lora_engine.patch import StackEntry
from tests.patch.conftest import make_host
from tests.fixtures.files.kohya import independent_delta, write_kohya


def _param(root, key, rows):
    p = root.get_parameter(key)
    return p if rows is None else p[rows[0]:rows[1]]


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("naming", ["diffusers", "a1111"])
def test_merged_equals_independent_sum(tmp_path, arch, naming):
    _, root, km = make_host(arch, naming)
    before = {k: v.detach().clone() for k, v in root.state_dict().items()}
    t1 = write_kohya(tmp_path / "a.safetensors", km, seed=1, alpha=1.0)
    t2 = write_kohya(tmp_path / "b.safetensors", km, seed=2, alpha=4.0, rank=4)
    cache = LoraCache()
    a, b = cache.get(tmp_path / "a.safetensors"), cache.get(tmp_path / "b.safetensors")
    eng = LoraEngine(root, km, Mode.MERGED)
    plan = eng.set_stack([StackEntry(a, te=0.7, unet=-0.4), StackEntry(b, te=1.3, unet=0.9)])
    assert not eng.warnings(), eng.warnings()
    expected: dict = {}
    for truth, te, unet in ((t1, 0.7, -0.4), (t2, 1.3, 0.9)):
        for name, (down, up, alpha) in truth.items():
            t = km.lookup(name)
            m = te if t.component == "te" else unet
            w0 = before[t.weight_key]
            w0 = w0 if t.rows is None else w0[t.rows[0]:t.rows[1]]
            key = (t.weight_key, t.rows)
            expected[key] = expected.get(key, w0.double()) + m * independent_delta(down, up, alpha, w0.shape)
    # one slot per weight: the q, k, v slices of a fused in_proj_weight are written together
    assert len({key for key, _ in expected}) == len(plan.contributions) > 10
    for (key, rows), want in expected.items():
        got = _param(root, key, rows)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=key)
    eng.restore()
    for k, v in root.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_restore_bit_exact_after_1000_switches(tmp_path, dtype):
    _, root, km = make_host("sd2", "a1111")  # includes fused OpenCLIP q/k/v row slices
    root.to(dtype)
    before = {k: v.detach().clone() for k, v in root.state_dict().items()}
    cache = LoraCache()
    files = []
    for i in range(3):
        write_kohya(tmp_path / f"l{i}.safetensors", km, seed=10 + i, fraction=0.3, dtype=torch.float16)
        files.append(cache.get(tmp_path / f"l{i}.safetensors"))
    eng = LoraEngine(root, km, Mode.MERGED)
    rnd = random.Random(0)
    for step in range(1000):
        stack = [StackEntry(f, te=rnd.choice([0.0, 1.0, -0.5, rnd.uniform(-2, 2)]), unet=rnd.uniform(-2, 2))
                 for f in files if rnd.random() < 0.6]
        rnd.shuffle(stack)
        eng.set_stack(stack)
    assert cache.misses == 3
    eng.restore()
    for k, v in root.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stack_order_does_not_matter(tmp_path):
    _, root, km = make_host("sd1", "diffusers")
    write_kohya(tmp_path / "a.safetensors", km, seed=1, fraction=0.8)
    write_kohya(tmp_path / "b.safetensors", km, seed=2, fraction=0.8)
    cache = LoraCache()
    a, b = cache.get(tmp_path / "a.safetensors"), cache.get(tmp_path / "b.safetensors")
    eng = LoraEngine(root, km)
    eng.set_stack([StackEntry(a, 0.5, 0.5), StackEntry(b, -1.0, 2.0)])
    one = {k: v.clone() for k, v in root.state_dict().items()}
    eng.restore()
    eng.set_stack([StackEntry(b, -1.0, 2.0), StackEntry(a, 0.5, 0.5)])
    for k, v in root.state_dict().items():
        assert torch.equal(v, one[k]), k


def test_changing_one_weight_touches_only_its_modules(tmp_path):
    _, root, km = make_host("sdxl", "a1111")
    write_kohya(tmp_path / "a.safetensors", km, seed=1, fraction=0.5)
    write_kohya(tmp_path / "b.safetensors", km, seed=2, fraction=0.1)
    cache = LoraCache()
    a, b = cache.get(tmp_path / "a.safetensors"), cache.get(tmp_path / "b.safetensors")
    eng = LoraEngine(root, km)
    eng.set_stack([StackEntry(a), StackEntry(b)])
    b_slots = {s for s, cs in eng.plan.contributions.items() if any(c.lora_id == b.path for c in cs)}
    untouched = {k: v.clone() for k, v in root.state_dict().items()}
    eng.set_stack([StackEntry(a), StackEntry(b, te=0.5, unet=0.5)])
    assert eng.stats.slots_written == len(b_slots) < len(eng.plan.contributions)
    b_keys = {eng.plan.targets[s].weight_key for s in b_slots}
    for k, v in root.state_dict().items():
        if k not in b_keys:
            assert torch.equal(v, untouched[k]), k
    # the same stack again writes nothing
    eng.set_stack([StackEntry(a), StackEntry(b, te=0.5, unet=0.5)])
    assert eng.stats.slots_written == 0
