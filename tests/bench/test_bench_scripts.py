"""The benchmark scripts run end to end on the tests' tiny model (so they do not rot between the runs
that produce the figures in bench/README.md), and what they check bit for bit holds: our merged
restore gives back every touched parameter exactly, with backups on the CPU and on the weight's device.
No timing is asserted."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_bench_apply_runs_and_restores_exactly_with_both_backup_places():
    out = _run("bench/bench_apply.py", "--models", "tiny", "--stacks", "1,2", "--reps", "1",
               "--backup", "cpu,same", "--threads", "1")
    speed = _table_rows(out, "| model | n | backup | touched MiB")
    assert [(r[0], r[1], r[2]) for r in speed] == [("tiny", n, b) for n in ("1", "2") for b in ("cpu", "same")]
    # a change of the last LoRA's weight rewrites every slot it touches (kohya targets: all of them)
    assert all(r[11] == "1.00" for r in speed)
    restore = _table_rows(out, "| model | n | backup | ours restore s")
    assert [r[5] for r in restore] == ["yes"] * 4, out
    # diffusers+PEFT merged the same files onto the same modules: same weights within float rounding
    assert all(float(r[-1]) < 1e-5 for r in restore), out
    otf = _table_rows(out, "| model | n | forward s")
    assert [r[1] for r in otf] == ["1", "2"] and all(float(r[5]) > 0 for r in otf)


def test_bench_sidepath_runs_on_the_tiny_model():
    out = _run("bench/bench_sidepath.py", "--model", "tiny", "--stacks", "1,2", "--reps", "2", "--rounds", "1",
               "--threads", "1")
    rows = _table_rows(out, "| n | Σ base ms")
    assert [r[0] for r in rows] == ["1", "2"]
    shares = [float(r[4]) for r in rows]
    assert shares[1] > shares[0] > 0  # two LoRAs: twice the side-path FLOPs
    assert re.search(r"\d+ UNet layers touched", out)


def test_bench_finite_check_runs_on_the_tiny_model():
    out = _run("bench/bench_finite_check.py", "--models", "tiny", "--stacks", "1,2", "--reps", "1", "--threads", "1")
    rows = _table_rows(out, "| model | n | touched MiB")
    assert [(r[0], r[1]) for r in rows] == [("tiny", "1"), ("tiny", "2")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)


def test_bench_threads_runs_its_commands():
    out = _run("bench/bench_threads.py", "--commands", "train,grid", "--configs", "default", "--train-steps", "1",
               "--grid-steps", "1")
    rows = _table_rows(out, "| command | threads")
    assert [(r[0], r[1], r[3]) for r in rows] == [("train", "default policy", "1.00"), ("grid", "default policy", "1.00")]
    assert re.search(r"before: .*load average", out) and "the policy now:" in out


def test_bench_dense_delta_runs_on_the_tiny_model():
    out = _run("bench/bench_dense_delta.py", "--model", "tiny", "--reps", "1", "--stacks", "1,2", "--dtypes", "fp32",
               "--threads", "1")
    rows = _table_rows(out, "| type | n | dtype")
    assert [(r[0], r[1]) for r in rows] == [(t, n) for t in ("loha", "lokr", "lora") for n in ("1", "2")]
    # ComfyUI's order of operations and ours give the same weights up to fp32 rounding
    assert all(float(r[-1]) < 1e-5 for r in rows), out
    assert "written from ComfyUI's formulas" in out


def test_bench_dit_runs_on_the_tiny_models():
    out = _run("bench/bench_dit.py", "--models", "tiny-flux,tiny-sd35m", "--ranks", "4", "--stacks", "2",
               "--reps", "1", "--rounds", "1", "--otf-tokens", "16")  # one stack size: the suite's time
    merged = _table_rows(out, "| model | tree | dialect | rank | n | touched")
    assert [(r[0], r[1], r[2], r[4]) for r in merged] == [
        (m, t, d, n) for m in ("tiny-flux", "tiny-sd35m") for t in ("diffusers", "native")
        for d in ("kohya", "diffusers") for n in ("2",)]
    assert all(r[12] == "yes" for r in merged), out  # our restore is bit-exact, on both trees
    for r in merged:  # diffusers fused every diffusers-dialect file; its kohya converters refuse the tiny widths
        if r[1] == "diffusers":
            assert (r[14].split()[-1] != "layers)") == (r[2] == "diffusers"), out
    extrapolated = _table_rows(out, "| model (full depth)")
    assert len(extrapolated) == len(merged)
    otf = _table_rows(out, "| model | rank | n | Σ base ms")
    assert [(r[0], r[2]) for r in otf] == [(m, "2") for m in ("tiny-flux", "tiny-sd35m")]
    assert all(float(r[6]) > 0 for r in otf)  # a LoRA FLOP share was counted


def test_bench_quant_runs_on_a_narrow_block():
    out = _run("bench/bench_quant.py", "--width", "256", "--tokens", "16", "--formats", "fp8,Q8_0", "--stacks", "0,2",
               "--reps", "1", "--threads", "1", "--merged")
    rows = _table_rows(out, "| format | n | base s")
    assert [(r[0], r[1]) for r in rows] == [("fp8", "0"), ("fp8", "2"), ("Q8_0", "0"), ("Q8_0", "2")]
    assert [r[8] for r in rows] == ["0.00", "1.00"] * 2  # on the fly holds the LoRA tensors, nothing more
    merged = _table_rows(out, "| format | merged apply s")
    assert [r[0] for r in merged] == ["fp8", "Q8_0"]
