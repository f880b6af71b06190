"""Fixtures: a tmp ``loras`` folder seen through the nodes' folder_paths seam, the tiny SD1 model as
ComfyUI holds it (shared; every test restores it), and lora-engine's own engine on an identical copy."""
from __future__ import annotations

import pytest

from comfy_nodes import folders
from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.keymap import build_keymap
from tests.hosts.comfy.models import comfy_pair, reference_root


@pytest.fixture
def loras(tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    folders.use(folders.DirectoryFolderPaths({"loras": [str(root)]}))
    yield root
    folders.use(None)


@pytest.fixture(scope="module")
def sd1():
    """(ModelPatcher, CLIP, TinySD) of the tiny SD1 model; tests must leave it unpatched."""
    return comfy_pair("sd1")


@pytest.fixture(scope="module")
def engine():
    root = reference_root("sd1")
    return LoraEngine(root, build_keymap(shapes_of(root)))
