"""Weight-sweep grid on the demo architecture, training jobs from the Train page, the loss chart."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from lora_engine.apps.ui.lossplot import loss_plot, smoothed

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def test_smoothed_is_a_bias_corrected_ema_and_plot_draws_it():
    xs = [4.0, 2.0, 3.0, 1.0]
    m, expect = 0.0, []
    for t, x in enumerate(xs, 1):
        m = 0.8 * m + 0.2 * x
        expect.append(m / (1 - 0.8 ** t))
    assert smoothed(xs, 0.8) == pytest.approx(expect)
    img = loss_plot(xs + [float("nan")])
    assert img.size == (480, 240)
    px = torch.tensor(list(img.tobytes())).reshape(240, 480, 3)
    assert ((px[..., 0] > 150) & (px[..., 1] < 80)).any()  # the red smoothed line


def test_sweep_cells_match_manual_application_and_restore(ctx, lora_root, demo_base):
    from lora_engine.apps.ui.sweep import DemoGenerator, SweepRunner, SweepSpec

    gen = DemoGenerator(demo_base)
    before = {k: v.clone() for k, v in gen.model.state_dict().items()}
    spec = SweepSpec("a purple circle", ("purple_style",), (-1.0, 0.0, 1.0), seed=3, steps=2)
    runner = SweepRunner(gen, ctx.loras)
    calls = []
    cells, warnings = runner.cells(spec, lambda d, t, w: calls.append((d, t, w)))
    assert calls[-1] == (3, 3, "purple_style at 1")
    after = gen.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit-exact
    plain = gen.render("a purple circle", 3, 2, 3.0)
    assert torch.equal(cells[0][1], plain)  # weight 0 is the base model
    # weight 1 by hand: W + α/r · up @ down on every module of the file
    sd = load_file(os.path.join(lora_root, "purple_style.safetensors"))
    manual = copy.deepcopy(gen.model)
    params = dict(manual.unet.named_parameters())
    with torch.no_grad():
        for key in [k for k in sd if k.endswith(".lora_down.weight")]:
            name = key.split(".")[0]
            dotted = name.replace("lora_unet_", "").replace("down_blocks_0_attentions_0_transformer_blocks_0_",
                                                            "down_blocks.0.attentions.0.transformer_blocks.0.")
            dotted = dotted.replace("up_blocks_2_attentions_0_transformer_blocks_0_",
                                    "up_blocks.2.attentions.0.transformer_blocks.0.")
            dotted = dotted.replace("attn1_", "attn1.").replace("attn2_", "attn2.") + ".weight"
            down, up = sd[key], sd[f"{name}.lora_up.weight"]
            params[dotted] += float(sd[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    from lora_engine.apps.demo.diffusion import sample

    by_hand = sample(manual, ["a purple circle"], 3, 2, 3.0)[0]
    assert (cells[0][2] - by_hand).abs().max() < 1e-4
    assert (cells[0][0] - plain).abs().max() > 1e-3 and (cells[0][2] - plain).abs().max() > 1e-3
    img, _ = runner.grid(SweepSpec("a purple circle", ("purple_style", "green_things"), (0.0, 1.0), steps=1))
    assert img.width > img.height > 0


def test_sweep_refuses_unknown_lora_and_bad_weights(ctx, demo_base):
    from lora_engine.apps.ui.context import UiConfig, UiContext
    from lora_engine.apps.ui.sweep import GenerateSession

    c = UiContext(UiConfig(ctx.config.lora_dirs, model=demo_base))
    c.scan()
    s = GenerateSession(c)
    img, msg = s.run("a circle", ["nope"], "0,1", 0, 1, 3.0)
    assert img is None and msg.startswith("error: ") and "nope" in msg
    img, msg = s.run("a circle", ["purple_style"], "0, x", 0, 1, 3.0)
    assert img is None and "must be numbers" in msg


def _wait(session, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        text, losses, finished = session.status()
        if finished:
            return text, losses
        time.sleep(0.2)
    raise AssertionError("training did not finish")


def test_train_session_runs_a_job_to_a_loadable_lora(ctx, lora_root, demo_base, tmp_path):
    from lora_engine.apps.demo.concept import write_concept_images
    from lora_engine.formats import load_lora
    from lora_engine.apps.ui.train_session import TrainForm, TrainSession

    write_concept_images(str(tmp_path / "datasets" / "images"), 4, seed=0)
    shutil.copy(demo_base, tmp_path / "models" / "base.safetensors")
    session = TrainSession(ctx)
    assert session.start(TrainForm("base.safetensors", "images", "trained", steps=3, batch_size=2)) == "started"
    text, losses = _wait(session)
    assert "state: done" in text and "step 3/3" in text, text
    assert len(losses) == 3 and all(l == l for l in losses)
    lf = load_lora(os.path.join(lora_root, "trained.safetensors"))
    assert lf.modules and lf.metadata.get("ss_output_name") == "trained"


def test_train_session_bad_folder_and_cancel(ctx, demo_base, tmp_path):
    from lora_engine.apps.demo.concept import write_concept_images
    from lora_engine.apps.ui.train_session import TrainForm, TrainSession

    session = TrainSession(ctx)
    shutil.copy(demo_base, tmp_path / "models" / "base.safetensors")
    msg = session.start(TrainForm("base.safetensors", "missing", "x"))
    assert msg.startswith("error: ") and "'missing' not found in" in msg
    assert session.status()[0] == msg
    write_concept_images(str(tmp_path / "datasets" / "images"), 4, seed=0)
    assert session.start(TrainForm("base.safetensors", "images", "long", steps=10000, batch_size=2)) == "started"
    assert "already in progress" in session.start(TrainForm("base.safetensors", "images", "y", steps=3))
    while session.job.status().step < 1 and session.job.status().state not in ("failed", "done"):
        time.sleep(0.1)
    session.cancel()
    text, losses = _wait(session)
    assert "state: cancelled" in text and 0 < len(losses) < 10000


@pytest.fixture
def model_ctx(ctx, demo_base):
    from lora_engine.apps.ui.context import UiContext

    c = UiContext(dataclasses.replace(ctx.config, model=demo_base))
    c.scan()
    return c


def test_unreadable_rows_are_skipped_with_one_line_before_the_model_loads(model_ctx, lora_root):
    with open(os.path.join(lora_root, "broken.safetensors"), "wb") as fh:
        fh.write(b"not a safetensors file")
    model_ctx.scan()
    session = model_ctx.generate_session()
    img, msg = session.run("a circle", ["broken"], "0, 1", 0, 1, 3.0)
    assert img is None and msg.startswith("error: no usable LoRA for the sweep: broken: ") and "\n" not in msg
    assert session.runner is None  # nothing left to draw: the model was never loaded
    img, msg = session.run("a circle", ["broken", "purple_style"], "0, 1", 0, 1, 3.0)
    lines = msg.splitlines()
    assert img is not None and lines[0] == "1 × 2 grid" and sum("broken" in line for line in lines) == 1
    assert lines[1].startswith("warning: broken: ") and lines[1].endswith("; row left out")


def test_preview_is_drawn_with_the_model_and_saved_beside_the_file(model_ctx, lora_root):
    from lora_engine.apps.ui.cards import card_html
    from lora_engine.apps.ui.preview import make_preview, preview_prompt, wanting_preview
    from tests.fixtures.files.ui import write_lora

    tags = {"imgs": {"a purple square": 3, "a purple circle": 5}, "more": {"a purple square": 4}}
    write_lora(os.path.join(lora_root, "tagged.safetensors"), seed=7, metadata={"ss_tag_frequency": json.dumps(tags)})
    model_ctx.scan()
    entry = next(e for e in model_ctx.library.entries if e.key == "tagged")
    assert preview_prompt(entry) == "a purple square"  # 7 over 5
    assert preview_prompt(next(e for e in model_ctx.library.entries if e.key == "green_things")) == "GreenThings"
    assert wanting_preview(model_ctx) == "green_things"  # purple_style has one
    line = make_preview(model_ctx, "tagged", steps=1)
    path = os.path.join(lora_root, "tagged.preview.png")
    assert line == f"wrote {path} ('a purple square')" and os.path.isfile(path)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (256, 256)
    entry = next(e for e in model_ctx.library.entries if e.key == "tagged")
    assert entry.sidecars.preview == path and "data:image/jpeg;base64," in card_html(entry)
    assert "has its own preview (purple_style.png)" in make_preview(model_ctx, "purple_style", steps=1)
    before = os.path.getmtime(path)
    assert make_preview(model_ctx, "tagged", "a green circle", steps=1).endswith("('a green circle')")
    assert os.path.getmtime(path) >= before


def test_an_unreadable_row_is_left_out_with_one_line(ctx, lora_root, demo_base, tmp_path):
    from lora_engine.apps.ui.sweep import DemoGenerator, SweepRunner, SweepSpec

    bad = os.path.join(lora_root, "zz_broken.safetensors")
    with open(bad, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    try:
        ctx.scan()
        runner = SweepRunner(DemoGenerator(demo_base), ctx.loras)
        cells, warnings = runner.cells(SweepSpec("a circle", ("zz_broken", "purple_style"), (0.0, 1.0), steps=1))
        assert len(cells) == 1 and len(cells[0]) == 2
        assert [w for w in warnings if "zz_broken" in w and "row left out" in w]
    finally:
        os.remove(bad)
        ctx.scan()
