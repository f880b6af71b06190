"""`Lora hashes` exactly as A1111 1.10 writes it, and pasted prompts mapped back by hash."""
from __future__ import annotations

import json
import os

from lora_engine.syntax.infotext import (addnet_tags, find_lora_hashes, hashes_for_tags, lora_hashes_field, lora_hashes_value,
                                  parse_lora_hashes, rewrite_prompt)
from lora_engine.library.index import LoraLibrary
from lora_engine.syntax.prompt import parse_prompt
from tests.library.conftest import write_lora


def test_field_format():
    pairs = [("ink", "0123456789ab"), ("a:b,c", "ba9876543210"), ("キャラ", "aaaaaaaaaaaa"), ("ink", "ffffffffffff")]
    assert lora_hashes_value(pairs) == "ink: ffffffffffff, abc: ba9876543210, キャラ: aaaaaaaaaaaa"
    assert lora_hashes_field(pairs) == 'Lora hashes: "ink: ffffffffffff, abc: ba9876543210, キャラ: aaaaaaaaaaaa"'
    assert lora_hashes_field([]) == "" and lora_hashes_field([("x", None)]) == ""


def test_parse_back():
    infotext = ('masterpiece <lora:ink:0.8>\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, '
                'Lora hashes: "ink: 0123456789ab, other: ba9876543210", Version: v1.10.1')
    assert find_lora_hashes(infotext) == {"ink": "0123456789ab", "other": "ba9876543210"}
    assert find_lora_hashes("Steps: 20, Lora hashes: ink: 0123456789ab, Version: x") == {"ink": "0123456789ab"}
    assert find_lora_hashes("Steps: 20") == {}
    assert parse_lora_hashes("broken, a: 1") == {"a": "1"}
    value = json.loads(lora_hashes_field([("x y", "0123456789ab")])[len("Lora hashes: "):])
    assert parse_lora_hashes(value) == {"x y": "0123456789ab"}


def test_renamed_file_still_resolves(tmp_path):
    root = tmp_path / "Lora"
    write_lora(root / "inkwash.safetensors", seed=1)
    write_lora(root / "other.safetensors", seed=2)
    lib = LoraLibrary([root])
    lib.scan()
    prompt = "a <lora:inkwash:0.8>, <lyco:other> and <lora:unknown:1>"
    pairs, warns = hashes_for_tags(parse_prompt(prompt).tags, lib)
    infotext = f"{prompt}\nSteps: 20, {lora_hashes_field(pairs)}"
    assert len(pairs) == 2 and "unknown" in warns[0]

    os.rename(root / "inkwash.safetensors", root / "sub_renamed.safetensors")   # user renames the file
    os.makedirs(root / "x")
    os.rename(root / "other.safetensors", root / "x" / "moved.safetensors")
    lib.refresh()
    new, notes = rewrite_prompt(prompt, find_lora_hashes(infotext), lib)
    assert new == "a <lora:sub_renamed:0.8>, <lyco:moved> and <lora:unknown:1>"
    assert notes == []
    assert [lib.resolve(t.name).stem for t in parse_prompt(new).tags[:2]] == ["sub_renamed", "moved"]


def test_unmatched_hash_is_reported(tmp_path):
    root = tmp_path / "Lora"
    write_lora(root / "a.safetensors")
    lib = LoraLibrary([root])
    lib.scan()
    new, notes = rewrite_prompt("<lora:gone:1>", {"gone": "0123456789ab"}, lib)
    assert new == "<lora:gone:1>" and "no local file" in notes[0]


def test_addnet_fields_become_tags(tmp_path):
    root = tmp_path / "Lora"
    write_lora(root / "renamed.safetensors", seed=4, rank=4, numel=80_000)  # > 1.1 MiB: a real legacy hash
    write_lora(root / "small.safetensors", seed=5)
    lib = LoraLibrary([root])
    lib.scan()
    legacy = lib.resolve("renamed").legacy_hash
    assert legacy != "e3b0c442"
    params = {"AddNet Enabled": "True", "AddNet Module 1": "LoRA", "AddNet Model 1": f"old_name({legacy})",
              "AddNet Weight A 1": "0.6", "AddNet Module 2": "LoRA", "AddNet Model 2": "gone(deadbeef)",
              "AddNet Module 3": "Hypernetwork", "AddNet Model 3": "hn(12345678)"}
    assert addnet_tags(params) == ["<lora:old_name:0.6>", "<lora:gone:1.0>"]
    assert addnet_tags(params, lib) == ["<lora:renamed:0.6>", "<lora:gone:1.0>"]


def test_for_model_filters_without_hiding_unknown(tmp_path):
    root = tmp_path / "Lora"
    write_lora(root / "xl.safetensors", te2=True)
    write_lora(root / "plain.safetensors", seed=2)           # no metadata, no TE: architecture unknown
    write_lora(root / "sd1.safetensors", {"ss_base_model_version": "sd_v1"}, seed=3)
    lib = LoraLibrary([root])
    lib.scan()
    assert sorted(e.stem for e in lib.for_model("SDXL")) == ["plain", "xl"]
    assert sorted(e.stem for e in lib.for_model("SD1", include_unknown=False)) == ["sd1"]
