"""`lora-engine train`: TOML settings, flags overriding them, a diffusers model folder on disk."""
from __future__ import annotations

import os

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
