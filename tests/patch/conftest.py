import pytest

from lora_engine.engine import shapes_of
from lora_engine.keymap import build_keymap
from tests.fixtures.models.hosts import a1111_root, diffusers_root
from tests.fixtures.models.tiny_sd import TinySD


def make_host(arch: str, naming: str, seed: int = 0):
    m = TinySD.build(arch, seed)
    root = diffusers_root(m) if naming == "diffusers" else a1111_root(m)
    return m, root, build_keymap(shapes_of(root))


@pytest.fixture
def host():
    return make_host
