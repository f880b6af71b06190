"""Optional test dependencies: what needs one is skipped at collection, with the reason, when it is missing.

- a whole module: ``require("peft")`` at the top (before importing the package), like ``pytest.importorskip``;
- one test: ``@needs("gradio")``, decided when the module is collected (``importlib.util.find_spec``).

Every package here is in the ``test`` extra of pyproject.toml; the reason says how to install it.
"""
from __future__ import annotations

import importlib.util

import pytest

# What else a package needs to work here: diffusers' model classes import transformers (through
# ``diffusers.loaders.peft``) when peft is installed, as in the test extra.
ALSO_NEEDS = {"diffusers": ("transformers",)}
# import name -> pip requirement
PIP_NAMES = {"PIL": "pillow", "lion_pytorch": "lion-pytorch", "lycoris": "lycoris-lora",
             "playwright.sync_api": "playwright"}


def reason(name: str) -> str:
    pip = PIP_NAMES.get(name, name.split(".")[0])
    return f"needs the optional package {pip} (pip install {pip}, or pip install -e '.[test]')"


def missing(name: str) -> bool:
    """True when ``name`` cannot be found (a missing parent package counts as missing)."""
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def require(name: str):
    """Module level: the imported module, or the whole test module is skipped with :func:`reason`."""
    for other in ALSO_NEEDS.get(name, ()):
        pytest.importorskip(other, reason=reason(other))
    return pytest.importorskip(name, reason=reason(name))


def needs(*names: str) -> pytest.MarkDecorator:
    """A skip marker for one test that needs these packages."""
    wanted = dict.fromkeys(n for name in names for n in (name, *ALSO_NEEDS.get(name, ())))
    gone = [n for n in wanted if missing(n)]
    return pytest.mark.skipif(bool(gone), reason="; ".join(reason(n) for n in gone) or "")
