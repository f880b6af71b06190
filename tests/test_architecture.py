"""The package layout keeps its promises: the core never imports a front-end, only the command line
imports the command line, and every host and front-end reaches LoRA files through ``lora_engine.loras``
(names → parsed files → stack entries) and builds engines with ``LoraEngine.for_model``."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ROOT / "lora_engine"
HOSTS_AND_APPS = [ROOT / "extension", ROOT / "comfy_nodes", CORE / "apps"]


def _modules(*folders):
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _imported(path: pathlib.Path, tree: ast.AST) -> set[str]:
    """Absolute names of every module imported by a file (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _calls(tree: ast.AST, name: str) -> int:
    return sum(1 for n in ast.walk(tree) if isinstance(n, ast.Call)
               and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name))


def test_the_core_never_imports_a_front_end_or_a_host():
    offenders = []
    for path, tree in _modules(CORE):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("lora_engine/apps/") or rel == "lora_engine/__main__.py":
            continue
        bad = {m for m in _imported(path, tree)
               if m.startswith(("lora_engine.apps", "extension", "comfy_nodes", "modules", "comfy"))}
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders


def test_only_the_command_line_imports_the_command_line():
    offenders = [path.relative_to(ROOT).as_posix() for path, tree in _modules(CORE, ROOT / "extension", ROOT / "comfy_nodes")
                 if not path.relative_to(ROOT).as_posix().startswith("lora_engine/apps/cli/")
                 and path.name != "__main__.py"
                 and any(m.startswith("lora_engine.apps.cli") for m in _imported(path, tree))]
    assert not offenders


def test_hosts_and_front_ends_reach_files_through_one_service():
    """No host or front-end assembles its own resolver + parser + stack entries: ``Loras`` does that
    (a library listing for display, e.g. ``lora-engine list``, is not a path to a weight)."""
    assembling = []
    for path, tree in _modules(*HOSTS_AND_APPS):
        rel = path.relative_to(ROOT).as_posix()
        if _calls(tree, "StackEntry") and rel not in ("comfy_nodes/loading.py", "comfy_nodes/info.py"):
            assembling.append(f"{rel}: builds StackEntry itself")
        if _calls(tree, "build_keymap") and _calls(tree, "LoraEngine"):
            assembling.append(f"{rel}: builds an engine by hand (use LoraEngine.for_model)")
        if _calls(tree, "LoraCache") and rel not in ("extension/controller.py", "comfy_nodes/loading.py"):
            assembling.append(f"{rel}: has its own parsed-file cache")
    assert not assembling
