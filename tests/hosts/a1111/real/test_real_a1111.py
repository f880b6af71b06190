"""Opt-in: lora-engine against the built-in Lora inside a real, running A1111 1.10 (``compare_builtin.py``),
when ``LORA_ENGINE_A1111`` names its folder (A1111 cannot be installed from the package registries, so
CI skips this). ``LORA_ENGINE_A1111_ARCH`` (sd1/sd2/sdxl, default sd1) names the loaded family and
``LORA_ENGINE_A1111_URL`` its API (default http://127.0.0.1:7860)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

A1111 = os.environ.get("LORA_ENGINE_A1111")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))


@pytest.mark.skipif(not A1111, reason="set LORA_ENGINE_A1111=/path/to/stable-diffusion-webui (running, --api)")
def test_same_images_and_better_weights_than_the_builtin(tmp_path):
    arch = os.environ.get("LORA_ENGINE_A1111_ARCH", "sd1")
    url = os.environ.get("LORA_ENGINE_A1111_URL", "http://127.0.0.1:7860")
    r = subprocess.run([sys.executable, "-m", "tests.hosts.a1111.real.compare_builtin", arch, A1111, str(tmp_path),
                        "--url", url], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0 and "ALL CHECKS PASSED" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
