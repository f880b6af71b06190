"""Machines without gradio, playwright or bitsandbytes (optional, and the hardest to install) still collect
the test suite: what needs them skips with a reason (``tests/optional.py``), nothing errors.

The check runs pytest's collection in a subprocess where those packages cannot be imported
(``sys.modules[name] = None`` makes ``import name`` raise ``ModuleNotFoundError``, as on a machine without
them), over the test modules that could reach them: those that name them or import the web UI or the A1111
glue. Collecting the whole tree would cost about a minute on a 2-core machine.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = ("gradio", "playwright", "bitsandbytes")
REACHES = MISSING + ("lora_engine.apps.ui", "from extension", "import extension")
RUNNER = ("import sys\n"
          "for name in sys.argv[1].split(','):\n"
          "    sys.modules[name] = None\n"
          "import pytest\n"
          "sys.exit(pytest.main(sys.argv[2:]))\n")


def modules_reaching(words) -> list[str]:
    """Test modules (relative paths) whose source mentions one of ``words``."""
    out = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, "tests")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.startswith("test_") and f.endswith(".py") and f != os.path.basename(__file__):
                path = os.path.join(folder, f)
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
                if any(w in text for w in words):
                    out.append(os.path.relpath(path, ROOT))
    return out


def test_collection_without_gradio_playwright_bitsandbytes():
    paths = modules_reaching(REACHES)
    assert "tests/ui/test_browser.py" in paths and "tests/hosts/a1111/test_train_tab.py" in paths
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", RUNNER, ",".join(MISSING), "--collect-only", "-q", *paths],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "error" not in out.lower().splitlines()[-1], out[-4000:]
    assert "tests/hosts/a1111/test_train_tab.py::test_on_ui_tabs_builds_the_tab_over_the_shared_page" in out
    assert "tests/ui/test_browser.py::" not in out  # skipped at import, with its reason
