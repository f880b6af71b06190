"""The one path from a tag to a stack entry (``lora_engine.loras``) and the one step-window type."""
from __future__ import annotations

import random

import pytest
import torch

from lora_engine.engine import LoraEngine
from lora_engine.errors import NameResolutionError
from lora_engine.loras import Loras
from lora_engine.patch import StackEntry
from lora_engine.patch.plan import build_plan
from lora_engine.syntax.blocks import block_ratios
from lora_engine.syntax.prompt import StepPoint, StepWindow, parse_prompt
from tests.patch.conftest import make_host
from tests.fixtures.files.kohya import write_kohya


def _tags(text):
    return parse_prompt(text).tags


def test_entry_carries_strengths_block_ratios_and_dyn(tmp_path):
    _, root, keymap = make_host("sd1", "diffusers")
    write_kohya(tmp_path / "style.safetensors", keymap, seed=1, rank=4, fraction=1.0)
    loras = Loras([tmp_path])
    tag = _tags("<lora:style:0.5:-2:dyn=2:lbw=0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,0>")[0]
    entry = loras.entry(tag)
    assert (entry.te, entry.unet, entry.dyn) == (0.5, -2.0, 2)
    assert entry.key == entry.lora.path == str(tmp_path / "style.safetensors")
    ratios = block_ratios(tag)
    plan = build_plan([entry], keymap)
    strengths = {c.module_name: c.strength for cs in plan.contributions.values() for c in cs}
    assert strengths  # some module is patched, and each at (te|unet) x its block ratio
    for name, s in strengths.items():
        assert s == (0.5 if name.startswith("lora_te") else -2.0) * ratios(name)
    assert any(ratios(n) == 0.0 for n in entry.lora.modules)  # the vector really switched some block off


def test_a_file_added_after_the_first_scan_is_found_and_bad_tags_are_one_line_each(tmp_path):
    _, root, keymap = make_host("sd1", "diffusers")
    write_kohya(tmp_path / "first.safetensors", keymap, seed=1)
    loras = Loras([tmp_path])
    assert loras.file("first").name  # scanned once here
    write_kohya(tmp_path / "later.safetensors", keymap, seed=2)
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    entries, warnings = loras.entries(_tags("<lora:later:1> <lora:missing:1> <lora:broken:1> <lora:first:0.5>"))
    assert [e.lora.name for e in entries] == ["later", "first"]
    assert len(warnings) == 2 and warnings[0].startswith("<lora:missing:1>") and "broken" in warnings[1]
    with pytest.raises(NameResolutionError):
        loras.resolve("missing")


def test_apply_puts_the_stack_on_the_engine_and_restores_bit_exact(tmp_path):
    _, root, keymap = make_host("sd1", "diffusers")
    write_kohya(tmp_path / "a.safetensors", keymap, seed=3, fraction=1.0)
    before = {k: v.clone() for k, v in root.state_dict().items()}
    engine = LoraEngine.for_model(root, mode="merged")
    loras = Loras([tmp_path])
    warnings = loras.apply(engine, _tags("<lora:a:0.7> <lora:nope:1>"))
    assert len(warnings) == 1 and "nope" in warnings[0]
    same = LoraEngine(root, keymap)  # the hand-built engine plans the same slots
    assert set(build_plan(engine.stack, same.keymap).contributions) == set(engine.plan.contributions)
    assert any(not torch.equal(before[k], v) for k, v in root.state_dict().items())
    engine.restore()
    assert all(torch.equal(before[k], v) for k, v in root.state_dict().items())


def test_set_folders_switches_the_library(tmp_path):
    _, _, keymap = make_host("sd1", "diffusers")
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    write_kohya(tmp_path / "x" / "one.safetensors", keymap, seed=1)
    write_kohya(tmp_path / "y" / "two.safetensors", keymap, seed=2)
    loras = Loras([tmp_path / "x"])
    assert loras.resolve("one")
    loras.set_folders([tmp_path / "y"])
    assert loras.resolve("two") and loras.folders == [str(tmp_path / "y")]
    with pytest.raises(NameResolutionError):
        loras.resolve("one")


@pytest.mark.parametrize("start,stop", [(None, None), (3.0, None), (None, 7.0), (0.25, 0.75), (2.0, 0.5), (5.0, 5.0)])
def test_step_window_active_steps_agree_with_its_fractions(start, stop):
    """``active_at`` (A1111 per step) and ``fractions`` (ComfyUI keyframes) describe the same steps:
    step index i of T is on exactly when start_fraction <= i/T < stop_fraction."""
    w = StepWindow(None if start is None else StepPoint(start), None if stop is None else StepPoint(stop))
    for total in (1, 4, 10, 20):
        lo, hi = w.fractions(total)
        for i in range(total):
            pos = i / total
            want = (lo is None or pos >= lo - 1e-12) and (hi is None or pos < hi - 1e-12)
            assert w.active_at(i, total) == want, (total, i)
    tag = _tags(f"<lora:a:1{'' if start is None else f':start={start:g}'}{'' if stop is None else f':stop={stop:g}'}>")[0]
    assert tag.window == w and tag.window.always == (start is None and stop is None)


def test_step_window_needs_the_step_count_for_step_numbers():
    assert StepWindow(StepPoint(0.3)).fractions(0) == (0.3, None)
    with pytest.raises(ValueError):
        StepWindow(StepPoint(4.0)).fractions(0)


def test_block_ratios_draw_random_entries_once_per_rng():
    tag = _tags("<lora:a:1:lbw=1,R,R,R,R,R,R,R,R,R,R,R,R,R,R,R,R>")[0]
    a, b = block_ratios(tag, random.Random(5)), block_ratios(tag, random.Random(5))
    assert a.ratios == b.ratios and isinstance(StackEntry(None, block_multiplier=a).block_multiplier(""), float)
