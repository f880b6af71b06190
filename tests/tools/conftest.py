"""One torch thread per tool test: LAPACK's SVD/QR on tiny matrices is up to 25x slower with two
threads on a loaded 2-core machine (measured), and the results do not depend on it."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
