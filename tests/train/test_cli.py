"""`lora-engine train`: TOML settings, flags overriding them, a diffusers model folder on disk."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lora_engine.apps.cli import main
from lora_engine.formats import load_lora
from tests.train.models import make_dataset, tiny_parts


@pytest.fixture
def setup(tmp_path):
    model = tiny_parts(str(tmp_path)).save(str(tmp_path / "model"))
    data = make_dataset(str(tmp_path / "data"), 2)
    toml = tmp_path / "train.toml"
    toml.write_text(f'base = "{model}"\nresolution = 32\nbucket_step = 8\nsteps = 9\nseed = 4\n'
                    "[network]\nrank = 2\nalpha = 1\n")
    return tmp_path, str(toml), data


def test_train_command_flags_override_file(setup, capsys):
    tmp_path, toml, data = setup
    out = str(tmp_path / "cli.safetensors")
    rc = main(["train", toml, "--data", data, "--output", out, "--steps", "2", "--rank", "3", "--batch-size", "2",
               "--lr", "0.001", "--sample-every", "2", "--sample-prompt", "red square"])
    assert rc == 0
    assert "done at step 2/2" in capsys.readouterr().out
    lf = load_lora(out)
    assert lf.metadata["ss_network_dim"] == "3" and lf.metadata["ss_network_alpha"] == "1.0"
    assert lf.metadata["ss_steps"] == "2" and lf.metadata["ss_unet_lr"] == "0.001"
    assert all(m.adapter.rank == 3 for m in lf.modules.values())
    assert os.listdir(tmp_path / "cli-samples") == ["step000002-0.png"]


def test_train_command_errors_are_one_line(setup, capsys):
    tmp_path, toml, data = setup
    rc = main(["train", toml, "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].endswith("missing: dataset folder does not exist")
    rc = main(["train", "--base", str(tmp_path), "--data", data, "--output", str(tmp_path / "x.safetensors")])
    assert rc == 1 and "not a diffusers model folder (no unet/ inside)" in capsys.readouterr().err
    rc = main(["train", toml, "--data", data, "--output", str(tmp_path / "x.safetensors"), "--dry-run"])
    assert rc == 0 and "buckets: 32x32: 2" in capsys.readouterr().out
    rc = main(["train", toml, "--data", data, "--output", str(tmp_path / "x.safetensors"), "--dry-run", "--epochs", "3"])
    assert rc == 0 and "6 steps (3.00 epochs)" in capsys.readouterr().out  # --epochs beats the file's steps = 9
    (tmp_path / "bad.toml").write_text("rnak = 4\n")
    rc = main(["train", str(tmp_path / "bad.toml"), "--base", str(tmp_path), "--data", data, "--output", "x"])
    assert rc == 1 and "unknown training setting 'rnak'" in capsys.readouterr().err


def test_presets_build_valid_configs_and_flags_win(setup, capsys):
    from lora_engine.train import build_config
    from lora_engine.train.presets import PRESETS

    for name, settings in PRESETS.items():
        cfg = build_config(settings)
        assert cfg.network.rank > 0 and cfg.dataset.resolution in (512, 1024), name
    tmp_path, toml, data = setup
    rc = main(["train", toml, "--preset", "sd15_style", "--data", data, "--output", str(tmp_path / "p.safetensors"),
               "--dry-run", "--batch-size", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "buckets: 32x32: 2" in out and "2 batches/epoch" in out  # file's resolution, flag's batch
    rc = main(["train", toml, "--preset", "nope", "--data", data, "--output", "x"])
    assert rc == 1 and "unknown preset 'nope'" in capsys.readouterr().err


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _spawn(args, cwd):
    """``python -m lora_engine ARGS`` as a user starts it (SIGINT reset to the default in the child: a shell
    without job control starts background commands with it ignored)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "lora_engine", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc, marker: bytes, seconds: float = 240) -> bytes:
    seen, deadline = b"", time.time() + seconds
    while marker not in seen and time.time() < deadline:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert marker in seen, seen[-2000:]
    return seen


def test_ctrl_c_at_any_moment_is_a_clean_stop(tmp_path):
    """Ctrl+C while starting (imports, model loading) and while training: exit 130, one line, no traceback; during
    training the first Ctrl+C saves the LoRA and its resume state."""
    from lora_engine.apps.demo.concept import write_concept_images

    write_concept_images(str(tmp_path / "data"), 4, seed=7)
    args = ["train", "--base", "demo", "--data", "data", "--output", "o.safetensors", "--steps", "100000",
            "--batch-size", "2", "--save-every", "100000"]
    proc = _spawn(args, tmp_path)
    try:
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert b"Traceback" not in err and err.strip().splitlines()[-1].startswith(b"lora-engine train: cancelled")
    assert not os.path.exists(tmp_path / "o.safetensors")

    proc = _spawn(args, tmp_path)
    try:
        seen = _wait_for(proc, b"loss=")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = seen + err
    assert proc.returncode == 130, err[-2000:]
    assert b"Traceback" not in err and b"stopping after this step and saving" in err
    step = int(out.decode().split("stopped at step ")[1].split("/")[0])
    assert out.decode().strip() == (f"stopped at step {step}/100000: o.safetensors (resume with --resume "
                                    "o.safetensors.trainstate)")
    assert load_lora(str(tmp_path / "o.safetensors")).metadata["ss_steps"] == str(step) and step >= 1
    assert os.path.isfile(tmp_path / "o.safetensors.trainstate")


def test_train_refuses_to_replace_an_output_unless_asked(setup, capsys):
    tmp_path, toml, data = setup
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"an earlier LoRA")
    assert main(["train", toml, "--data", data, "--output", str(out), "--steps", "1"]) == 1
    assert capsys.readouterr().err.strip() == f"lora-engine train: {out} exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"an earlier LoRA"
    assert main(["train", toml, "--data", data, "--output", str(out), "--steps", "1", "--overwrite"]) == 0
    assert load_lora(str(out)).metadata["ss_steps"] == "1"
