"""A file whose metadata holds a lone surrogate escape (``"\\ud800"``, valid JSON that Python decodes into text
UTF-8 cannot encode), and a file name that is not UTF-8, in a shared folder: ``lora-engine list`` (text, JSON,
from the cache), ``inspect``, the library cache and the web UI's cards all still work, and the rest of the
library is listed."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from lora_engine.apps.cli import main as cli_main
from lora_engine.library.index import LoraLibrary
from lora_engine.library.sidecar import DEFAULT_CACHE_NAME
from lora_engine.apps.ui.context import UiConfig, UiContext
from lora_engine.apps.ui.library_page import render_cards
from tests.library.conftest import write_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BAD = {"ss_output_name": "bad\ud800name", "ss_network_dim": "\udcff", "\ud800key": "v", "emoji": "\ud83d\ude00"}


def _with_metadata(path: str, meta: dict) -> str:
    """Rewrite a valid file's header with ``meta`` as ``json.dumps`` writes it (lone surrogates as escapes)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = meta
    text = json.dumps(header).encode("ascii")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return path


@pytest.fixture
def shared(lora_dir):
    write_lora(lora_dir / "good.safetensors", metadata={"ss_output_name": "good"}, seed=1)
    _with_metadata(write_lora(lora_dir / "odd.safetensors", seed=2), BAD)
    return lora_dir


def _cli(*args: str, encoding: str = "utf-8") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING=encoding, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lora_engine", *args], cwd=ROOT, env=env, capture_output=True,
                          timeout=300)


def _printable(obj) -> None:
    json.dumps(obj, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate anywhere


def test_list_inspect_and_cache_with_surrogate_metadata(shared):
    for run in (1, 2):  # the second run answers from the cache
        done = _cli("list", "--dir", str(shared))
        out, err = done.stdout.decode("utf-8"), done.stderr.decode("utf-8")
        assert done.returncode == 0 and "Traceback" not in err, err
        assert "2 LoRA file(s)" in out and "alias 'bad\ufffdname'" in out and "good" in out, out
        assert ("2 read, 0 from cache" if run == 1 else "0 read, 2 from cache") in out, out
    cache = json.load(open(shared / DEFAULT_CACHE_NAME, encoding="utf-8"))
    assert any(rec["metadata"].get("ss_output_name") == "bad\ufffdname" for rec in cache["entries"].values())


def test_list_json_and_inspect_in_process(shared, capsys):
    assert cli_main(["list", "--dir", str(shared), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    odd = next(f for f in doc["files"] if f["stem"] == "odd")
    assert odd["alias"] == "bad\ufffdname" and odd["problems"] == []
    assert odd["metadata"] == {"ss_output_name": "bad\ufffdname", "ss_network_dim": "\ufffd", "\ufffdkey": "v",
                               "emoji": "\U0001F600"}
    for extra in ([], ["--json"]):
        assert cli_main(["inspect", str(shared / "odd.safetensors"), *extra]) == 0
        out = capsys.readouterr().out
        assert "bad\ufffdname" in (json.loads(out)[0]["metadata"]["ss_output_name"] if extra else out)


def test_a_console_that_cannot_show_the_text_gets_escapes(shared):
    done = _cli("list", "--dir", str(shared), "--no-cache", encoding="ascii")
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert b"alias 'bad\\ufffdname'" in done.stdout, done.stdout


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names there are always Unicode")
def test_a_file_name_that_is_not_utf8(shared):
    name = os.fsdecode(b"caf\xe9.safetensors")  # Latin-1 bytes: "caf\udce9.safetensors" to Python
    write_lora(os.path.join(shared, name), seed=3)
    done = _cli("list", "--dir", str(shared))
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert b"3 LoRA file(s)" in done.stdout and b"caf\\udce9" in done.stdout, done.stdout
    again = LoraLibrary([shared])  # the name round-trips through the cache written by that run
    assert again.scan().reused == 3 and any(e.stem == "caf\udce9" for e in again.entries)


def test_library_cache_round_trip_and_ui_cards(shared):
    lib = LoraLibrary([shared])
    assert lib.scan().read == 2
    again = LoraLibrary([shared])
    report = again.scan()
    assert report.reused == 2 and report.read == 0
    for e in again.entries:
        _printable(e.to_json())
    odd = again.resolve("bad\ufffdname")
    assert odd.stem == "odd" and odd.metadata["ss_network_dim"] == "\ufffd"
    html = render_cards(UiContext(UiConfig((str(shared),)), library=again))
    html.encode("utf-8")
    assert "bad\ufffdname" in html and "good" in html


def test_text_from_a_cache_or_a_sidecar_is_cleaned(shared):
    odd = str(shared / "odd.safetensors")
    st = os.stat(odd)
    (shared / "odd.json").write_text('{"description": "x\\ud800y", "\\udcffk": ["\\ud800"]}')
    # a cache written by something else, holding the escapes as such
    cache = {"version": 1, "entries": {odd: {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "metadata":
                                             {"ss_output_name": "c\ud800"}, "has_cover": False, "sha256": "0" * 64,
                                             "addnet": "1" * 64, "legacy": "2" * 8, "format": "kohya",
                                             "architecture": "sd1", "summarized": True, "problems": [],
                                             "unreadable": False}}}
    (shared / DEFAULT_CACHE_NAME).write_text(json.dumps(cache))
    lib = LoraLibrary([shared])
    assert lib.scan().reused == 1
    e = next(x for x in lib.entries if x.stem == "odd")
    assert e.alias == "c\ufffd" and e.sidecars.description == "x\ufffdy"
    assert e.sidecars.user_metadata == {"description": "x\ufffdy", "\ufffdk": ["\ufffd"]}
    _printable(e.to_json())
