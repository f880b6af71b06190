"""``lora-engine demo`` as a user runs it: argument errors, and Ctrl+C leaving nothing behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("diffusers")

from lora_engine.apps.cli import build_parser, main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_is_a_subcommand():
    args = build_parser().parse_args(["demo", "--out", "x", "--weights=-1,1"])
    assert args.out == "x" and callable(args.func)


def test_bad_weights_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "o"), "--weights=-1,heavy"])
    assert "--weights" in str(e.value) and "heavy" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_missing_base_file_is_one_clear_line(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "o"), "--base", str(tmp_path / "nope.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) >= 1 and "nope.safetensors" in err[-1] and "cannot open" in err[-1]
    assert os.listdir(tmp_path) == []  # no output folder, no staging folder


def test_ctrl_c_during_training_leaves_no_partial_output(tmp_path):
    out = tmp_path / "demo_out"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A shell without job control starts background commands with SIGINT ignored, and Python then keeps
    # it ignored: reset it in the child so Ctrl+C is what the demo sees, however the tests were launched.
    proc = subprocess.Popen([sys.executable, "-m", "lora_engine", "demo", "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    deadline = time.time() + 240
    try:
        while b"train LoRA" not in seen and time.time() < deadline:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        assert b"train LoRA" in seen, seen[-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (seen + err)[-2000:]
    assert b"cancelled; nothing was written" in err
    assert os.listdir(tmp_path) == []  # neither demo_out nor the hidden staging folder


def _png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_train_and_generate_on_the_demo_model(tmp_path, capsys, monkeypatch):
    """`train --base demo` trains on the model the web UI trains on (32x32, no buckets), and `generate demo`
    draws with its LoRA: by tag from --lora-dir, or from demo_out/ (where `lora-engine demo` writes)."""
    from lora_engine.apps.demo.base import get_base
    from lora_engine.apps.demo.concept import write_concept_images
    from lora_engine.apps.demo.diffusion import sample
    from lora_engine.apps.demo.grid import to_pil
    from lora_engine.formats import load_lora

    data = tmp_path / "data"
    write_concept_images(str(data), 4, seed=7)
    lora = tmp_path / "loras" / "purple.safetensors"
    train = ["train", "--base", "demo", "--data", str(data), "--output", str(lora), "--steps", "3", "--batch-size", "2",
             "--lr", "0.02"]
    assert main(train) == 0
    assert "done at step 3/3" in capsys.readouterr().out
    lf = load_lora(lora)
    assert lf.metadata["ss_resolution"] == "(32, 32)" and lf.metadata["ss_enable_bucket"] == "False"
    assert lf.metadata["ss_sd_model_name"] == "lora-engine demo base" and len(lf.modules) > 10
    assert main(train[:-4] + ["--resolution", "64", "--overwrite"]) == 1
    assert "the demo model trains at 32x32 pixels (resolution 64 asked)" in capsys.readouterr().err

    out = tmp_path / "images"
    gen = ["generate", "demo", "a purple circle", "--steps", "4", "--out", str(out)]
    assert main(gen) == 0
    assert main(gen[:2] + ["a purple circle <lora:purple:1>", "--lora-dir", str(lora.parent)] + gen[3:]) == 0
    plain, tagged = capsys.readouterr().out.split()
    assert "warning" not in plain + tagged
    model, _ = get_base()
    expected = np.asarray(to_pil(sample(model, ["a purple circle"], 0, 4, 3.0)[0], 4))
    assert np.array_equal(_png(plain), expected)  # seed 0, guidance 3, 32x32 shown 4x
    assert _png(plain).shape == (128, 128, 3) and not np.array_equal(_png(tagged), _png(plain))

    monkeypatch.chdir(tmp_path)
    os.makedirs("demo_out")
    os.replace(lora, os.path.join("demo_out", "demo_purple.safetensors"))
    assert main(["generate", "demo", "a purple circle <lora:demo_purple:1>", "--steps", "4", "--out", "again"]) == 0
    (path,) = capsys.readouterr().out.split()
    assert np.array_equal(_png(path), _png(tagged))


def test_demo_refuses_to_replace_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "demo_grid.png").write_bytes(b"earlier")
    assert main(["demo", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == f"lora-engine demo: {out / 'demo_grid.png'} exists; pass --overwrite " \
                                              "to replace it"
    assert (out / "demo_grid.png").read_bytes() == b"earlier" and os.listdir(tmp_path) == ["o"]
