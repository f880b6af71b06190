"""`lora-engine parse` and `lora-engine list` end to end."""
from __future__ import annotations

import json

from lora_engine.apps.cli import main
from tests.library.conftest import write_lora


def test_parse_text_and_json(capsys):
    assert main(["parse", "a <lora:ink:0.5:lbw=MIDD:start=0.3> b"]) == 0
    out = capsys.readouterr().out
    assert "prompt: a b" in out and "'ink'" in out and "MIDD" in out and "30% of steps" in out
    assert main(["parse", "<lora:x:zz> <lora:y:1:dyn=4>", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in doc["tags"]] == ["y"] and doc["tags"][0]["dyn"] == 4
    assert len(doc["warnings"]) == 1 and "<lora:x:zz>" in doc["warnings"][0]


def test_list(tmp_path, capsys):
    root = tmp_path / "Lora"
    write_lora(root / "a" / "dup.safetensors", {"ss_output_name": "Nice"}, seed=1)
    write_lora(root / "b" / "dup.safetensors", seed=2)
    assert main(["list", "--dir", str(root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(f["name"] for f in doc["files"]) == ["a/dup", "b/dup"]
    assert doc["collisions"][0]["kind"] == "stem" and len(doc["collisions"][0]["paths"]) == 2
    assert all(len(f["short_hash"]) == 12 and f["format"] == "kohya" for f in doc["files"])
    assert main(["list", "--dir", str(root)]) == 0
    text = capsys.readouterr().out
    assert "collision (stem) 'dup'" in text and "alias 'Nice'" in text and "from cache" in text
    assert main(["list", "--dir", str(tmp_path / "nope")]) == 2
