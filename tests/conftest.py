"""Shared fixtures: tiny real models built from configs (seeded), and helpers to run them."""
from __future__ import annotations

import os
import sys

import pytest
import torch

# Tests import helpers as "tests.<pkg>" (the repo root also holds ComfyUI's __init__.py).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One thread: tiny models are launch-bound, and CI has 2 cores (several test processes may share them).
# The CLI's thread policy reads OMP_NUM_THREADS first, so commands run in-process or spawned keep one too.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
