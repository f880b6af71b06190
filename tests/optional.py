"""Optional test dependencies: what needs one is skipped at collection, with the reason, when it is missing.

- a module that imports one at import time: ``require("hypothesis")`` before that import (or
  ``pytest.importorskip``); a conftest doing it skips its whole directory;
- a test that imports one in its body, or calls a tests/ helper or fixture that does (``TinySD`` builds
  diffusers/transformers models): skipped by :func:`skip_missing` (the ``pytest_collection_modifyitems``
  hook of ``tests/conftest.py``), which reads the ``import`` statements of the test's code and, recursively,
  of the tests/ functions, classes and fixtures it names;
- a test that reaches one through lora-engine's own code (hidden from that reading): ``@needs("gradio")``.

Every package here is in the ``test`` extra of pyproject.toml; the reason says how to install it.
"""
from __future__ import annotations

import dis
import functools
import importlib.util
import types

import pytest

from lora_engine.extras import IMPORT_NAMES

OPTIONAL = ("diffusers", "transformers", "peft", "lycoris", "gradio", "playwright", "bitsandbytes", "gguf", "PIL",
            "tqdm", "prodigyopt", "lion_pytorch", "hypothesis")
# What else a package needs to work here: diffusers' model classes import transformers (through
# ``diffusers.loaders.peft``) when peft is installed, as in the test extra.
ALSO_NEEDS = {"diffusers": ("transformers",)}
# import name -> pip requirement, where they differ (the runtime extras' table, plus lycoris-lora for the tests)
PIP_NAMES = {**{imp: dist for dist, imp in IMPORT_NAMES.items()}, "lycoris": "lycoris-lora"}


def reason(name: str) -> str:
    pip = PIP_NAMES.get(name.split(".")[0], name.split(".")[0])
    return f"needs the optional package {pip} (pip install {pip}, or pip install -e '.[test]')"


@functools.lru_cache(maxsize=None)
def missing(name: str) -> bool:
    """True when ``name`` cannot be found (a missing parent package counts as missing)."""
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _with_implied(names) -> list[str]:
    return list(dict.fromkeys(n for name in names for n in (name, *ALSO_NEEDS.get(name, ()))))


def require(name: str):
    """Module level: the imported module, or the whole test module is skipped with :func:`reason`."""
    for other in ALSO_NEEDS.get(name, ()):
        pytest.importorskip(other, reason=reason(other))
    return pytest.importorskip(name, reason=reason(name))


def needs(*names: str) -> pytest.MarkDecorator:
    """A skip marker for one test that needs these packages."""
    gone = [n for n in _with_implied(names) if missing(n)]
    return pytest.mark.skipif(bool(gone), reason="; ".join(reason(n) for n in gone) or "")


# ---- what a test's code imports -------------------------------------------------------------------

def _ours(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith("tests.")


@functools.lru_cache(maxsize=None)
def _code_parts(code: types.CodeType) -> tuple[frozenset, tuple, tuple]:
    """(top-level packages it imports, or asks ``pytest.importorskip`` for by a literal name; names it uses;
    nested code objects)."""
    imported = {i.argval.split(".")[0] for i in dis.get_instructions(code) if i.opname == "IMPORT_NAME"}
    if "importorskip" in code.co_names:
        imported |= {c.split(".")[0] for c in code.co_consts if isinstance(c, str) and c.split(".")[0] in OPTIONAL}
    nested = tuple(c for c in code.co_consts if isinstance(c, types.CodeType))
    return frozenset(imported), tuple(code.co_names), nested


def _functions_of(obj) -> list[types.FunctionType]:
    """The tests/ functions behind ``obj``: itself, a class's methods, a module's functions."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        return [f for f in (obj.fget, obj.fset) if f is not None]
    if isinstance(obj, types.FunctionType):
        return [obj] if _ours(obj) else []
    if isinstance(obj, type) and _ours(obj):
        return [f for v in vars(obj).values() for f in _functions_of(v)]
    if isinstance(obj, types.ModuleType) and obj.__name__.startswith("tests."):
        return [v for v in vars(obj).values() if isinstance(v, types.FunctionType) and v.__module__ == obj.__name__]
    return []


def imported_by(functions) -> set[str]:
    """Top-level packages imported by these functions and, recursively, by the tests/ code they name."""
    out: set[str] = set()
    seen: set = set()
    todo = [(f.__code__, f.__globals__) for f in functions]
    while todo:
        code, globs = todo.pop()
        if code in seen:
            continue
        seen.add(code)
        imported, names, nested = _code_parts(code)
        out |= imported
        todo.extend((c, globs) for c in nested)
        for name in names:
            for f in _functions_of(globs.get(name)):
                todo.append((f.__code__, f.__globals__))
    return out


def _item_functions(item) -> list[types.FunctionType]:
    funcs = []
    obj = getattr(getattr(item, "obj", None), "__func__", getattr(item, "obj", None))
    if isinstance(obj, types.FunctionType):
        funcs.append(obj)
    info = getattr(item, "_fixtureinfo", None)
    for defs in (getattr(info, "name2fixturedefs", None) or {}).values():
        for d in defs:
            f = getattr(d.func, "__func__", d.func)
            if isinstance(f, types.FunctionType) and _ours(f):
                funcs.append(f)
    return funcs


def skip_missing(items) -> None:
    """Mark each test whose code (or tests/ helper or fixture) imports a missing optional package."""
    if not any(missing(name) for name in OPTIONAL):
        return  # the usual case: nothing to read
    for item in items:
        wanted = imported_by(_item_functions(item)) & set(OPTIONAL)
        gone = [n for n in _with_implied(sorted(wanted)) if missing(n)]
        if gone:
            item.add_marker(pytest.mark.skip(reason="; ".join(reason(n) for n in gone)))
