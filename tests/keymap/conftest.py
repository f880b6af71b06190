"""Tiny models of each family, built once per test session (they are read-only in these tests)."""
from __future__ import annotations

import pytest

from tests.fixtures.models.tiny_sd import ARCHS, TinySD


@pytest.fixture(scope="session")
def tiny_models():
    return {arch: TinySD.build(arch) for arch in ARCHS}
