"""bench/fuzz_loader.py and bench/bench_header.py run end to end on small settings (no timing asserted), so they
do not rot between the runs that give the figures in bench/README.md."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_fuzz_loader_runs_and_reports_every_kind():
    out = _run("bench/fuzz_loader.py", "--n", "36", "--seed", "3")
    assert "36 variants, seed 3" in out and "other outcomes: 0" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| kind")]
    assert len(rows) == 13 and rows[-1].startswith("| **all** | 36 |"), out
    one = _run("bench/fuzz_loader.py", "--seed", "3", "--only", "7")  # variant 7 alone, as the run made it
    assert one.startswith("#7 nesting/")


def test_bench_header_runs_against_a_baseline_revision():
    out = _run("bench/bench_header.py", "--cases", "deep", "--repeat", "1", "--baseline", "HEAD")
    rows = [line for line in out.splitlines() if line.startswith("| deep |")]
    assert [r.split("|")[3].strip() for r in rows] == ["HEAD", "this tree"], out
    assert all("nested deeper than" in r for r in rows), out
