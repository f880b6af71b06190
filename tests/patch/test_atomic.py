"""Applying a stack is all or nothing: a LoRA whose math fails on its weight (it loads and passes the
shape check) leaves the model bit-identical and the engine usable, in merged and on-the-fly mode;
``restore`` puts back every backed-up slot whatever the plan says; a non-finite result is refused per
slot (the slot keeps its previous value) with a warning; absurd strengths are warned about."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lora_engine.patch.merged as merged_mod
from lora_engine.engine import LoraEngine, Mode
from lora_engine.errors import PatchError
from lora_engine.library.parsed import LoraCache
from lora_engine.patch import PatchPlan, StackEntry
from lora_engine.patch.onthefly import _ModuleHook
from tests.patch.conftest import make_host
from tests.fixtures.files.kohya import independent_delta, lowrank_targets, names_by_target, write_kohya


def _state(root) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in root.state_dict().items()}


def _assert_same(root, state) -> None:
    for k, v in root.state_dict().items():
        assert torch.equal(v, state[k]), k


def _broken_loha(path, name: str, target) -> None:
    """A LoHa module that loads and fits ``target`` by shape but whose first factor has a trailing
    1-dim: (o, r, 1) @ (r, i) fails inside the math."""
    o, rest, r = target.shape[0], tuple(target.shape[1:]), 2
    save_file({f"{name}.hada_w1_a": torch.randn(o, r, 1), f"{name}.hada_w1_b": torch.randn(r, *rest),
               f"{name}.hada_w2_a": torch.randn(o, r), f"{name}.hada_w2_b": torch.randn(r, *rest),
               f"{name}.alpha": torch.tensor(2.0)}, str(path))


def _huge(path, name: str, target, value: float) -> None:
    """A plain LoRA on one target whose ΔW = value²·r is huge (Inf in fp32 for value 1e30)."""
    o, rest = target.shape[0], tuple(target.shape[1:])
    save_file({f"{name}.lora_down.weight": torch.full((2, *rest), value),
               f"{name}.lora_up.weight": torch.full((o, 2, *([1] * (len(rest) - 1))), value),
               f"{name}.alpha": torch.tensor(2.0)}, str(path))


@pytest.fixture
def sd1(tmp_path):
    """A tiny SD1 host in A1111 naming and two kohya LoRAs on overlapping random subsets (~8 %, about
    17 slots each, some shared) of its 215 Linear/Conv targets."""
    m, root, km = make_host("sd1", "a1111")
    cache = LoraCache()
    write_kohya(tmp_path / "a.safetensors", km, seed=1, fraction=0.08)
    write_kohya(tmp_path / "b.safetensors", km, seed=2, fraction=0.08)
    return m, root, km, cache, cache.get(tmp_path / "a.safetensors"), cache.get(tmp_path / "b.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_failure_at_every_slot_write_leaves_the_model_bit_identical(sd1, monkeypatch, dtype):
    """The per-slot compute raises at its k-th call for every k (after writing its result where it
    writes it: into the weight itself for fp32); the model is bit-identical each time, then a good
    change and a restore are exact."""
    _, root, km, _, a, b = sd1
    root.to(dtype)
    original = _state(root)
    eng = LoraEngine(root, km, Mode.MERGED)
    eng.set_stack([StackEntry(a, 0.7, 0.5), StackEntry(b, 1.0, -1.0)])
    applied, plan, backups = _state(root), eng.plan, set(eng._patcher.backups)
    wanted = [StackEntry(a, -0.3, 1.2)]  # re-weights a's slots and drops b's (put back to W₀)
    real = merged_mod.merged_weight
    calls = {"n": 0, "fail_at": -1}

    def failing(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] - 1 == calls["fail_at"]:
            raise RuntimeError("injected failure")
        return result

    monkeypatch.setattr(merged_mod, "merged_weight", failing)
    k = 0
    while True:
        calls.update(n=0, fail_at=k)
        try:
            eng.set_stack(wanted)
        except PatchError as e:
            assert "injected failure" in str(e) and "the model was left as it was" in str(e)
            _assert_same(root, applied)
            assert eng.plan is plan and set(eng._patcher.backups) == backups and eng._patcher.plan is plan
            k += 1
            continue
        break
    assert k == len(eng.plan.contributions) > 10  # one failure per slot position, then the clean run
    monkeypatch.setattr(merged_mod, "merged_weight", real)
    # the engine is still usable: what it applied equals a fresh engine's result, and restore is exact
    got = _state(root)
    eng.restore()
    _assert_same(root, original)
    LoraEngine(root, km, Mode.MERGED).set_stack(wanted)
    _assert_same(root, got)


def test_broken_adapter_at_every_position_changes_nothing(sd1, tmp_path):
    """A real LoHa that fails inside its math, put in turn on each slot being changed (so it comes at
    every place among the writes, whatever their order), next to a LoRA that changes and one that leaves."""
    _, root, km, cache, a, b = sd1
    original = _state(root)
    eng = LoraEngine(root, km, Mode.MERGED)
    eng.set_stack([StackEntry(a, 0.7, 0.5), StackEntry(b)])
    applied, plan = _state(root), eng.plan
    names = names_by_target(km)
    targets = [plan.targets[s] for s in sorted(plan.contributions)]
    targets.append(next(t for t in lowrank_targets(km) if t not in targets))  # and one slot at W₀
    assert len(targets) > 20
    for i, target in enumerate(targets):
        path = tmp_path / f"bad{i}.safetensors"
        _broken_loha(path, names[target], target)
        with pytest.raises(PatchError) as err:
            eng.set_stack([StackEntry(a, -0.3, 1.2), StackEntry(cache.get(path))])
        line = str(err.value)
        assert str(path) in line and names[target] in line and "\n" not in line, line
        _assert_same(root, applied)
        assert eng.plan is plan
    eng.set_stack([StackEntry(a, -0.3, 1.2)])  # still usable
    eng.restore()
    _assert_same(root, original)


def test_restore_puts_back_every_backup_whatever_the_plan_says(sd1):
    _, root, km, _, a, b = sd1
    original = _state(root)
    eng = LoraEngine(root, km, Mode.MERGED)
    eng.set_stack([StackEntry(a), StackEntry(b, 0.5, 2.0)])
    eng._patcher.plan = PatchPlan()  # a plan that has lost track of what was written
    eng.restore()
    _assert_same(root, original)
    assert not eng._patcher.backups


def test_restore_after_a_failed_change_is_exact(sd1, tmp_path):
    _, root, km, cache, a, b = sd1
    original = _state(root)
    target = lowrank_targets(km)[-1]
    _broken_loha(tmp_path / "bad.safetensors", names_by_target(km)[target], target)
    eng = LoraEngine(root, km, Mode.MERGED)
    eng.set_stack([StackEntry(a)])
    with pytest.raises(PatchError):
        eng.set_stack([StackEntry(b), StackEntry(cache.get(tmp_path / "bad.safetensors"))])
    eng.restore()
    _assert_same(root, original)


def _hooks(root) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules())


def test_onthefly_install_failing_halfway_leaves_no_hooks(sd1, monkeypatch):
    m, root, km, _, a, b = sd1
    eng = LoraEngine(root, km, Mode.ONTHEFLY)
    real = _ModuleHook.prepare
    calls = {"n": 0, "fail_at": -1}

    def failing(self, term):
        calls["n"] += 1
        if calls["n"] - 1 == calls["fail_at"]:
            raise RuntimeError("injected failure")
        return real(self, term)

    monkeypatch.setattr(_ModuleHook, "prepare", failing)
    eng.set_stack([StackEntry(a), StackEntry(b)])  # count the terms
    terms = calls["n"]
    eng.restore()
    assert terms > 20
    for k in range(terms):  # every place the failure can come
        calls.update(n=0, fail_at=k)
        with pytest.raises(PatchError, match="injected failure"):
            eng.set_stack([StackEntry(a), StackEntry(b)])
        assert _hooks(root) == 0 and not eng._patcher.hooks and not eng.stack
    calls["fail_at"] = -1
    eng.set_stack([StackEntry(a)])
    hooked = _hooks(root)
    assert hooked > 0
    calls.update(n=0, fail_at=30)  # a change failing halfway keeps exactly the hooks there were
    with pytest.raises(PatchError):
        eng.set_stack([StackEntry(a, 0.5, 0.5), StackEntry(b)])
    assert _hooks(root) == hooked
    assert all(t.contribution.strength == 1.0 for h in eng._patcher.hooks.values() for ts in h.terms.values() for t in ts)
    eng.restore()
    assert _hooks(root) == 0


def test_onthefly_broken_adapter_fails_at_install_not_in_a_forward(sd1, tmp_path):
    m, root, km, cache, a, _ = sd1
    target = lowrank_targets(km)[-1]
    _broken_loha(tmp_path / "bad.safetensors", names_by_target(km)[target], target)
    eng = LoraEngine(root, km, Mode.ONTHEFLY)
    with pytest.raises(PatchError, match="bad.safetensors"):
        eng.set_stack([StackEntry(a), StackEntry(cache.get(tmp_path / "bad.safetensors"))])
    assert _hooks(root) == 0


def _a_slot_of(plan, lora_path: str) -> tuple[str, object]:
    slot = next(s for s, cs in sorted(plan.contributions.items()) if any(c.lora_id == lora_path for c in cs))
    return slot, plan.targets[slot]


def _region(root, target) -> torch.Tensor:
    w = root.get_parameter(target.weight_key).detach()
    return w if target.rows is None else w[target.rows[0]:target.rows[1]]


def test_non_finite_result_keeps_the_slot_and_warns(sd1, tmp_path):
    _, root, km, cache, a, _ = sd1
    original = _state(root)
    eng = LoraEngine(root, km, Mode.MERGED)
    eng.set_stack([StackEntry(a)])
    slot, target = _a_slot_of(eng.plan, a.path)
    names = names_by_target(km)
    fresh_target = next(t for t in lowrank_targets(km) if t not in {eng.plan.targets[s] for s in eng.plan.contributions})
    _huge(tmp_path / "h1.safetensors", names[target], target, 1e30)  # on a slot a already holds
    _huge(tmp_path / "h2.safetensors", names[fresh_target], fresh_target, 1e30)  # on a slot at W₀
    held, at_w0 = _region(root, target).clone(), _region(root, fresh_target).clone()
    huge = [StackEntry(cache.get(tmp_path / "h1.safetensors")), StackEntry(cache.get(tmp_path / "h2.safetensors"))]
    eng.set_stack([StackEntry(a)] + huge)
    assert torch.equal(_region(root, target), held) and torch.equal(_region(root, fresh_target), at_w0)
    lines = eng.warnings()
    assert len(lines) == 2 and all("left as they were" in x and "would not be finite" in x for x in lines), lines
    assert all(torch.isfinite(v).all() for v in root.state_dict().values())
    # the refused slots are known to hold their previous values: dropping the huge LoRAs writes nothing
    eng.set_stack([StackEntry(a)])
    assert eng.stats.slots_written == 0 and not eng.warnings()
    eng.restore()
    _assert_same(root, original)


def test_finite_sum_that_overflows_half_precision_is_refused(sd1, tmp_path):
    _, root, km, cache, a, _ = sd1
    root.half()
    original = _state(root)
    target = lowrank_targets(km)[0]
    _huge(tmp_path / "h.safetensors", names_by_target(km)[target], target, 300.0)  # ΔW = 2·300² = 180000
    eng = LoraEngine(root, km, Mode.MERGED)
    eng.set_stack([StackEntry(cache.get(tmp_path / "h.safetensors")), StackEntry(a)])
    assert any("would not be finite" in x for x in eng.warnings())
    assert torch.equal(_region(root, target), original[target.weight_key] if target.rows is None
                       else original[target.weight_key][target.rows[0]:target.rows[1]])
    assert all(torch.isfinite(v).all() for v in root.state_dict().values())
    assert any(not torch.equal(v, original[k]) for k, v in root.state_dict().items())  # a was applied


def test_absurd_strength_warns_and_is_refused_where_it_overflows(sd1):
    _, root, km, _, a, _ = sd1
    original = _state(root)
    eng = LoraEngine(root, km, Mode.MERGED)
    eng.set_stack([StackEntry(a, te=1e308, unet=1e308)])  # what <lora:a:1e308> asks for
    (line,) = eng.warnings()
    assert "outside ±100" in line and "would not be finite" in line, line
    _assert_same(root, original)
    eng.set_stack([StackEntry(a, te=1.0, unet=150.0)])
    (line,) = eng.warnings()
    assert "strength unet 150 is outside ±100" in line, line
    slot, target = _a_slot_of(eng.plan, a.path)
    assert not torch.equal(_region(root, target), original[target.weight_key])  # applied all the same
    quiet = LoraEngine(root, km, Mode.MERGED, max_strength=200.0)
    eng.restore()
    quiet.set_stack([StackEntry(a, te=1.0, unet=150.0)])
    assert not quiet.warnings()
    quiet.restore()
    _assert_same(root, original)


def test_onthefly_non_finite_factors_are_not_hooked(sd1, tmp_path):
    m, root, km, cache, a, _ = sd1
    target = lowrank_targets(km)[0]
    _huge(tmp_path / "h.safetensors", names_by_target(km)[target], target, 1e30)
    eng = LoraEngine(root, km, Mode.ONTHEFLY)
    eng.set_stack([StackEntry(a)])
    hooked = set(eng._patcher.hooks)
    eng.set_stack([StackEntry(a), StackEntry(cache.get(tmp_path / "h.safetensors"), te=1e10, unet=1e10)])
    lines = eng.warnings()
    assert len(lines) == 1 and "not finite" in lines[0] and "outside ±100" in lines[0], lines
    assert set(eng._patcher.hooks) == hooked  # the huge module's layer got no term
    eng.restore()
    assert _hooks(root) == 0
