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

# One thread: tiny models are launch-bound, and CI has 2 cores (several test processes may share them);
# LAPACK's SVD/QR on tiny matrices ran up to 25x slower with two threads on a loaded 2-core machine.
# The CLI's thread policy reads OMP_NUM_THREADS first, so commands run in-process or spawned keep one too.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one intra-op thread, whatever an earlier test (a demo run, a thread-policy
    test) set; the results do not depend on it."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def pytest_collection_modifyitems(config, items):
    """Tests that import a missing optional package, themselves or through a tests/ helper or fixture,
    are skipped here with the reason (``tests/optional.py``)."""
    from tests.optional import skip_missing

    skip_missing(items)
