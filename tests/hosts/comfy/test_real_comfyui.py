"""Opt-in: the pack inside a real ComfyUI checkout (``comfyui_smoke.py``: SD1 layout; ``comfyui_flux_smoke.py``:
Flux.1 with CLIP-L + T5, the on-the-fly mode), when ``LORA_ENGINE_COMFYUI`` names one (ComfyUI cannot be
installed from the package registries, so CI skips this). ``LORA_ENGINE_COMFYUI_PYTHON`` picks the
interpreter that has ComfyUI's requirements; this checkout goes first on its path, so the scripts test its
``lora_engine``."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMFYUI = os.environ.get("LORA_ENGINE_COMFYUI")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


@pytest.mark.skipif(not COMFYUI, reason="set LORA_ENGINE_COMFYUI=/path/to/ComfyUI to run against real ComfyUI")
@pytest.mark.parametrize("script", ["comfyui_smoke.py", "comfyui_flux_smoke.py"])
def test_real_comfyui(script):
    python = os.environ.get("LORA_ENGINE_COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([python, os.path.join(HERE, script), ROOT], cwd=COMFYUI, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "ALL CHECKS PASSED" in r.stdout, (r.stdout[-4000:] + r.stderr[-4000:])
