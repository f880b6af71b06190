"""``lora-engine demo`` as a user runs it: argument errors, and Ctrl+C leaving nothing behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
