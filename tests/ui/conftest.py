"""Fixtures of the web UI tests: a LoRA folder of real kohya files and a UI context over it, with
(empty) model and dataset folders beside it."""
from __future__ import annotations

import pytest

from tests.fixtures.files.ui import lora_folder


@pytest.fixture
def lora_root(tmp_path):
    return lora_folder(tmp_path / "loras")


@pytest.fixture
def ctx(lora_root, tmp_path):
    from lora_engine.apps.ui.context import UiConfig, UiContext

    (tmp_path / "models").mkdir()
    (tmp_path / "datasets").mkdir()
    c = UiContext(UiConfig((lora_root,), model_dirs=(str(tmp_path / "models"),),
                           dataset_dirs=(str(tmp_path / "datasets"),)))
    c.scan()
    return c


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory):
    """A demo base model file with freshly initialised weights (the real architecture, no training)."""
    pytest.importorskip("diffusers")
    from lora_engine.apps.demo.model import build_model, save_model

    path = tmp_path_factory.mktemp("demo") / "demo_base.safetensors"
    save_model(build_model(0), path)
    return str(path)
