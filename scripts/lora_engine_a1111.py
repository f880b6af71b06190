"""AUTOMATIC1111 entry point of lora-engine: load ``extension/`` under a unique package name and
register its callbacks. All logic lives in ``extension/`` (A1111 glue) and ``lora_engine/`` (core).

A1111 puts the extension root on ``sys.path`` only while this file runs, so the root is added for
good here (appended: it must never shadow A1111's own modules), and ``extension/`` is imported as
``lora_engine_a1111``: the built-in Lora already owns top-level names like ``networks`` and ``lora``.
"""
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ALIAS = "lora_engine_a1111"


def _load_extension_package():
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)
    if _ALIAS in sys.modules:
        return sys.modules[_ALIAS]
    folder = os.path.join(_ROOT, "extension")
    spec = importlib.util.spec_from_file_location(_ALIAS, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_ALIAS] = module
    spec.loader.exec_module(module)
    return module


_load_extension_package()
importlib.import_module(_ALIAS + ".callbacks").register()
importlib.import_module(_ALIAS + ".train_tab").register()
