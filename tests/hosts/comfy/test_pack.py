"""The pack as ComfyUI sees it: the root ``__init__.py`` imported like ComfyUI imports a custom-node
folder (a path-derived module name), prefixed node ids, node contracts, the folder seam, the info node."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, folders, loading
from comfy_nodes.info import LoraEngineInfo, trigger_words
from tests.fixtures.files.comfy import kohya_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# A few of ComfyUI's built-in node ids near ours (a pack's node with a built-in id is dropped silently).
BUILTINS = {"LoraLoader", "LoraLoaderModelOnly", "CreateHookLora", "CLIPTextEncode", "LoraModelLoader"}


def test_root_init_imports_like_comfyui(tmp_path):
    name = ROOT.replace(os.sep, "_x_").replace(".", "_x_")  # ComfyUI: module path with "." -> "_x_"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)
        web = os.path.join(ROOT, module.WEB_DIRECTORY)
        assert os.path.isdir(web) and os.path.realpath(web) != os.path.realpath(os.path.join(ROOT, "javascript"))
        assert "launch" not in sys.modules and "modules.shared" not in sys.modules  # nothing A1111-specific
        assert "folder_paths" not in sys.modules and "comfy.hooks" not in sys.modules  # ComfyUI imported lazily
    finally:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]


def test_node_contracts(loras):
    (loras / "k.safetensors").write_bytes(b"")  # only listed, never read
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("LoraEngine") and node_id not in BUILTINS
        assert cls.CATEGORY == "lora-engine" and callable(getattr(cls, cls.FUNCTION))
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        for section in spec.values():
            for inp in section.values():
                assert isinstance(inp, tuple) and isinstance(inp[0], (str, list))
        assert len(cls.RETURN_TYPES) == len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
    assert NODE_CLASS_MAPPINGS["LoraEngineLoader"].INPUT_TYPES()["required"]["lora_name"][0] == ["k.safetensors"]


def test_directory_folder_paths(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for p in ("a/x.safetensors", "a/sub/y.SAFETENSORS", "a/notes.txt", "b/x.safetensors", "b/z.pt"):
        (tmp_path / p).write_bytes(b"")
    fp = folders.DirectoryFolderPaths({"loras": [str(tmp_path / "a"), str(tmp_path / "b")]})
    assert fp.get_filename_list("loras") == sorted(["x.safetensors", os.path.join("sub", "y.SAFETENSORS"), "z.pt"])
    assert fp.get_full_path("loras", "x.safetensors") == str(tmp_path / "a" / "x.safetensors")  # first root wins
    assert fp.get_full_path("loras", "../b/z.pt") is None
    folders.use(fp)
    try:
        with pytest.raises(Exception, match="nothere.safetensors: not found"):
            folders.lora_path("nothere.safetensors")
    finally:
        folders.use(None)


def test_info_node(loras, sd1):
    import json

    model, clip, m = sd1
    kohya_lora(loras / "k.safetensors", m)
    (loras / "k.json").write_text(json.dumps({"activation text": "inkstyle"}))
    out = LoraEngineInfo().info("k.safetensors", model, clip)
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    assert "format: kohya" in text and "architecture: sd1" in text
    assert "trigger words: inkstyle, cat, blue sky, mat" in text
    assert "AutoV2" in text
    n = len(loading.CACHE.get(loras / "k.safetensors").modules)
    assert f"this model: {n} of {n} modules match" in text
    te_only = LoraEngineInfo().info("k.safetensors", model)["result"][0]
    assert "no text encoder" in te_only.splitlines()[-1]
    bad = LoraEngineInfo().info("missing.safetensors")["result"][0]
    assert "missing.safetensors" in bad and "not found" in bad


def test_trigger_words_tolerates_bad_metadata():
    assert trigger_words({"ss_tag_frequency": "{not json"}, {}) == []
    assert trigger_words({"ss_tag_frequency": '{"d": {"a": 2, "b": 5}}'}, {"activation text": " x "}) == ["x", "b", "a"]
