"""The demo's main claim: its LoRA, applied with ``<lora:demo_purple:w>``, moves the pictures
toward the trained colour at w = 1 and away from it at w = −1 (same seeds), and the run writes
a grid PNG and a kohya LoRA that every module of which the engine matches.

The run uses fewer LoRA steps and DDIM steps than the CLI default to stay fast on 2 cores.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

from lora_engine.apps.demo.base import base_path  # noqa: E402
from lora_engine.apps.demo.concept import ConceptSettings  # noqa: E402
from lora_engine.apps.demo.run import DemoOptions, run_demo  # noqa: E402

FAST = dict(steps=int(os.environ.get("DEMO_TEST_LORA_STEPS", "80")))
PROMPTS = ("a purple circle", "a purple square")
WEIGHTS = (-1.0, 0.0, 1.0)


def purpleness(images: torch.Tensor) -> float:
    """Independent of the demo's own score: the mean, over pixels, of the saturation-weighted
    closeness of the hue to purple (HSV hue 280 deg), computed with numpy."""
    arr = images.permute(0, 2, 3, 1).numpy().astype(np.float64)
    mx, mn = arr.max(-1), arr.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0.0)
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    closeness = np.cos(np.radians(hue - 280.0))
    return float((sat * closeness).mean())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The demo model is tiny: one thread is fastest (the CLI's default too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):
    if not base_path()[1]:
        pytest.fail("the demo base weights are not shipped (lora_engine/apps/demo/assets/demo_base.safetensors)")
    out = tmp_path_factory.mktemp("demo") / "out"
    opts = DemoOptions(out=str(out), prompts=PROMPTS, weights=WEIGHTS, sample_steps=10,
                       concept=dataclasses.replace(ConceptSettings(), **FAST))
    return opts, run_demo(opts)


def test_outputs_written_and_nothing_else(demo):
    opts, res = demo
    assert sorted(os.listdir(opts.out)) == ["demo_grid.png", "demo_purple.safetensors"]
    from PIL import Image

    with Image.open(res.grid) as im:
        assert im.format == "PNG" and im.width > 3 * 128 and im.height > 2 * 128
    parent = os.path.dirname(opts.out)
    assert os.listdir(parent) == ["out"]  # the staging folder is gone


def test_lora_file_is_kohya_and_fully_matched(demo):
    from lora_engine.engine import shapes_of
    from lora_engine.formats import load_lora
    from lora_engine.keymap import build_keymap
    from lora_engine.apps.demo.model import load_model

    _, res = demo
    lf = load_lora(res.lora)
    assert lf.format == "kohya" and not lf.problems
    assert lf.metadata["ss_output_name"] == "demo_purple" and lf.metadata["ss_network_dim"] == "4"
    km = build_keymap(shapes_of(load_model(res.base)))
    assert all(km.lookup(n, m.dotted) is not None for n, m in lf.modules.items())
    assert any(n.startswith("lora_te_") for n in lf.modules) and any(n.startswith("lora_unet_") for n in lf.modules)


def test_reported_scores_move_with_the_weight(demo):
    _, res = demo
    s = res.scores
    assert s[1.0] > s[0.0] + 0.02, s
    assert s[-1.0] < s[0.0], s


def test_effect_through_on_the_fly_hooks_independent_statistic(demo):
    """Same LoRA file, applied by the other patcher (hooks, weights untouched), scored by another
    statistic: toward purple at +1, away at -1; and the model is bit-identical afterwards."""
    from lora_engine.apps.demo.diffusion import sample
    from lora_engine.apps.demo.model import load_model
    from lora_engine.engine import LoraEngine, shapes_of
    from lora_engine.formats import load_lora
    from lora_engine.keymap import build_keymap
    from lora_engine.patch import StackEntry

    _, res = demo
    model = load_model(res.base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = LoraEngine(model, build_keymap(shapes_of(model)), mode="onthefly")
    lf = load_lora(res.lora)
    score = {}
    for w in WEIGHTS:
        engine.set_stack([StackEntry(lf, te=w, unet=w)])
        score[w] = purpleness(sample(model, list(PROMPTS), seed=0, steps=10))
    engine.restore()
    assert score[1.0] > score[0.0] + 0.02, score
    assert score[-1.0] < score[0.0], score
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
