"""A command that needs an optional package which is not installed says, in one line on stderr, which
extra to install, and exits 1 (``lora_engine.extras``). Missing packages are simulated the way Python
sees an uninstalled one: ``sys.modules[name] = None`` in a fresh interpreter."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

from lora_engine import extras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(tmp_path, hidden: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    code = (f"import sys\nfor m in {hidden!r}:\n    sys.modules[m] = None\n"
            f"from lora_engine.apps.cli import main\nsys.exit(main({argv!r}))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_demo_without_tqdm_names_the_models_extra(tmp_path):
    out = _cli(tmp_path, ["tqdm"], ["demo", "--out", str(tmp_path / "o")])
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == ("lora-engine demo needs the 'models' extra (no module named 'tqdm'): "
                          "pip install 'lora-engine[models]'\n")
    assert not (tmp_path / "o").exists()


def test_each_command_names_its_own_extra(tmp_path):
    out = _cli(tmp_path, ["PIL"], ["train", "--data", str(tmp_path), "--output", str(tmp_path / "x.safetensors")])
    assert out.returncode == 1 and out.stderr.splitlines() == [
        "lora-engine train needs the 'train' extra (no module named 'PIL'): pip install 'lora-engine[train]'"]
    out = _cli(tmp_path, ["gradio"], ["serve", "--lora-dir", str(tmp_path)])
    assert out.returncode == 1 and out.stderr.splitlines() == [
        "lora-engine serve needs the 'ui' extra (no module named 'gradio'): pip install 'lora-engine[ui]'"]


def test_a_module_missing_once_the_command_runs_gets_the_same_line(tmp_path):
    """The package is found (the check before the run passes) but a module of it cannot be imported."""
    out = _cli(tmp_path, ["tqdm.std"], ["generate", str(tmp_path), "a cat"])
    assert out.returncode == 1 and out.stderr.splitlines() == [
        "lora-engine generate needs the 'models' extra (no module named 'tqdm.std'): "
        "pip install 'lora-engine[models]'"]


def test_a_missing_module_no_extra_provides_is_raised_as_is(tmp_path):
    out = _cli(tmp_path, ["lora_engine.apps.generate"], ["generate", str(tmp_path), "a cat"])
    assert out.returncode == 1 and "Traceback" in out.stderr and "ModuleNotFoundError" in out.stderr
    assert extras.missing_line("generate", "lora_engine.apps.generate") is None


def test_the_table_follows_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        optional = tomllib.load(f)["project"]["optional-dependencies"]
    providers: dict[str, tuple] = {}
    for extra, requirements in optional.items():
        if extra == "test":
            continue
        for req in requirements:
            dist = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
            module = extras.IMPORT_NAMES.get(dist, dist)
            providers[module] = providers.get(module, ()) + (extra,)
    assert providers == extras.PROVIDERS
    for command, (extra, modules) in extras.COMMANDS.items():
        assert all(extra in extras.PROVIDERS[m] for m in modules), command
