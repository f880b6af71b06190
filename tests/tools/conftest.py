"""Shared fixtures of the tool tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def flux():
    """A tiny diffusers Flux model (seed 3) and its native (BFL-named) tree."""
    pytest.importorskip("diffusers")
    from tests.fixtures.models.flux import NativeTree, flux_model, native_state

    d = flux_model(seed=3)
    return d, NativeTree(native_state(d))
