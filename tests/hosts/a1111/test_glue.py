"""Smaller glue: the script entry (unique package name, callbacks registered), paste hook by hash,
the /sdapi/v1/loras answer, settings, install.py, cards, denoiser row layout."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import save_file
import torch

from extension import api, infotext
from extension import page as page_mod
from extension.page import card_fields
from extension.runtime import denoiser_rows
from extension.settings import Settings
from tests.hosts.a1111.conftest import make_network
from tests.hosts.a1111.standin import Opts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# modules.script_callbacks as A1111 1.10 declares it: on_X(callback, *, name=None)
FAKE_CALLBACKS = textwrap.dedent('''
    registered = []
    def _on(kind):
        def register(callback, *, name=None):
            registered.append(kind)
        return register
    for _k in ("ui_settings", "before_ui", "before_component", "model_loaded", "cfg_denoiser", "infotext_pasted",
               "app_started", "script_unloaded", "ui_tabs"):
        globals()["on_" + _k] = _on(_k)
''')


def _run_entry_script(tmp_path, callbacks_module: str, then: str) -> str:
    """Run scripts/lora_engine_a1111.py in a fresh interpreter against a ``modules.script_callbacks``
    stand-in, then ``then`` (code that prints); returns what it printed."""
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "__init__.py").write_text("")
    (tmp_path / "modules" / "script_callbacks.py").write_text(callbacks_module)
    code = textwrap.dedent(f'''
        import runpy, sys
        sys.path.insert(0, {str(tmp_path)!r})
        runpy.run_path({os.path.join(ROOT, "scripts", "lora_engine_a1111.py")!r})
        from modules import script_callbacks
    ''') + textwrap.dedent(then)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_entry_script_registers_callbacks_under_a_unique_package(tmp_path):
    printed = _run_entry_script(tmp_path, FAKE_CALLBACKS, '''
        bad = [m for m in ("extension", "networks", "network", "lora", "lora_patches") if m in sys.modules]
        print(sorted(script_callbacks.registered), "lora_engine_a1111.callbacks" in sys.modules, bad)
    ''')
    assert printed == ("['app_started', 'before_component', 'before_ui', 'cfg_denoiser', 'infotext_pasted', "
                       "'model_loaded', 'script_unloaded', 'ui_settings', 'ui_tabs'] True []"), printed


# modules.script_callbacks.add_callback as A1111 1.10 names a callback: "<extension folder>/<basename of the
# first stack frame outside script_callbacks.py>/<category>"
NAMING_CALLBACKS = textwrap.dedent('''
    import inspect, os
    registered = []
    def _on(kind):
        def register(callback, *, name=None):
            caller = [f.filename for f in inspect.stack() if f.filename != __file__][0]
            registered.append("lora-engine/" + os.path.basename(caller) + "/" + kind)
        return register
    for _k in ("ui_settings", "before_ui", "before_component", "model_loaded", "cfg_denoiser", "infotext_pasted",
               "app_started", "script_unloaded", "ui_tabs"):
        globals()["on_" + _k] = _on(_k)
''')


def _a1111_before_ui_call_order(names: list[str], ini_path: str) -> list[str]:
    """A1111 1.10's order: sort_callbacks (metadata.ini After/Before -> util.topological_sort), then
    before_ui_callback iterates ``reversed(...)``."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ini_path)
    deps = {n: [] for n in names}
    for section in config.sections():
        name = section[len("callbacks/"):]
        if not section.startswith("callbacks/") or name not in deps:
            continue
        for after in config.get(section, "After", fallback="").replace(",", " ").split():
            if after in deps:
                deps[name].append(after)
        for before in config.get(section, "Before", fallback="").replace(",", " ").split():
            if before in deps:
                deps[before].append(name)
    seen, order = set(), []

    def visit(n):
        seen.add(n)
        for d in deps[n]:
            if d not in seen:
                visit(d)
        order.append(n)

    for n in deps:
        if n not in seen:
            visit(n)
    return list(reversed(order))


def test_metadata_ini_makes_our_before_ui_run_after_the_builtins(tmp_path):
    """Found in a real A1111 1.10.1: with the section under the wrong callback name (and `After`), the
    built-in's before_ui ran last and kept <lora:...>."""
    ours = _run_entry_script(tmp_path, NAMING_CALLBACKS, '''
        print([n for n in script_callbacks.registered if n.endswith("/before_ui")][0])
    ''')
    builtin = "lora/lora_script.py/before_ui"  # extensions-builtin/Lora/scripts/lora_script.py, loaded first
    called = _a1111_before_ui_call_order([builtin, "hypertile/hypertile_script.py/before_ui", ours],
                                         os.path.join(ROOT, "metadata.ini"))
    assert called[-1] == ours and called.index(builtin) < called.index(ours), called


def test_app_started_takes_the_tags_back_if_registered_over(tmp_path):
    import types

    from extension.callbacks import claim_tags
    from extension.controller import Controller

    registry, aliases = {}, {}
    extra_networks = types.SimpleNamespace(  # modules.extra_networks: a dict and two setters
        extra_network_registry=registry,
        register_extra_network=lambda n: registry.__setitem__(n.name, n),
        register_extra_network_alias=lambda n, alias: aliases.__setitem__(alias, n))
    c = Controller(Opts({}), [str(tmp_path)], cache_path=None)
    ours, other = types.SimpleNamespace(name="lora"), types.SimpleNamespace(name="lora")
    c.network = ours
    registry["lora"] = ours
    assert claim_tags(c, extra_networks) is False and c.builtin is None
    registry["lora"] = other  # e.g. the folder was renamed, so metadata.ini's order did not apply
    assert claim_tags(c, extra_networks) is True
    assert registry["lora"] is ours and aliases["lyco"] is ours and c.builtin is other


def _a1111_modules(monkeypatch):
    """``modules.extra_networks`` (registry, setters, ExtraNetwork) and ``modules.ui_extra_networks``
    (ExtraNetworksPage names itself by its lower-cased title; extra_pages, register_page) as A1111 1.10
    declares them, put in ``sys.modules`` for this test."""
    import types

    en, uen = types.ModuleType("modules.extra_networks"), types.ModuleType("modules.ui_extra_networks")
    en.extra_network_registry, en.aliases = {}, {}
    en.register_extra_network = lambda n: en.extra_network_registry.__setitem__(n.name, n)
    en.register_extra_network_alias = lambda n, alias: en.aliases.__setitem__(alias, n)
    en.ExtraNetwork = type("ExtraNetwork", (), {"__init__": lambda self, name: setattr(self, "name", name)})
    uen.extra_pages = []
    uen.ExtraNetworksPage = type("ExtraNetworksPage", (), {"__init__": lambda self, title: setattr(self, "name", title.lower())})
    uen.register_page = uen.extra_pages.append
    shared = types.ModuleType("modules.shared")
    shared.sd_model = None
    modules = types.ModuleType("modules")
    modules.extra_networks, modules.ui_extra_networks, modules.shared = en, uen, shared
    for name, m in (("modules", modules), ("modules.extra_networks", en), ("modules.ui_extra_networks", uen),
                    ("modules.shared", shared)):
        monkeypatch.setitem(sys.modules, name, m)
    return en, uen


@pytest.mark.parametrize("handover", [False, True])
@pytest.mark.parametrize("builtin_first", [True, False])
def test_first_component_leaves_one_lora_page_and_our_tags(tmp_path, monkeypatch, handover, builtin_first):
    """Found in a real A1111 1.10.1 with extensions/lora-engine a symlink: A1111 resolves the callback's
    file to the link's target, so metadata.ini's order did not apply, the built-in's before_ui ran after
    ours and the UI had two "Lora" tabs. The first component of the UI takes tags and page back."""
    from extension import callbacks
    from extension.controller import Controller

    en, uen = _a1111_modules(monkeypatch)
    monkeypatch.setattr(callbacks, "_CONTROLLER", Controller(Opts({"lora_engine_handover": handover}),
                                                             [str(tmp_path)], cache_path=None))
    builtin_net, builtin_page = en.ExtraNetwork("lora"), uen.ExtraNetworksPage("Lora")
    other_page = uen.ExtraNetworksPage("Textual Inversion")
    uen.register_page(other_page)

    def builtin_before_ui():  # extensions-builtin/Lora/scripts/lora_script.py
        uen.register_page(builtin_page)
        en.register_extra_network(builtin_net)

    for before_ui in ([builtin_before_ui, callbacks.before_ui] if builtin_first else
                      [callbacks.before_ui, builtin_before_ui]):
        before_ui()
    c = callbacks.controller()
    assert (len([p for p in uen.extra_pages if p.name == "lora"]) == 2) == (not builtin_first)
    callbacks.before_component(object(), elem_id="txt2img_prompt")
    lora_pages = [p for p in uen.extra_pages if p.name == "lora"]
    assert len(lora_pages) == 1 and other_page in uen.extra_pages
    assert (lora_pages[0] is builtin_page) == handover == c.builtin_cards
    assert en.extra_network_registry["lora"] is c.network and en.aliases["lyco"] is c.network
    assert c.builtin is builtin_net
    uen.register_page(uen.ExtraNetworksPage("Lora"))  # only the first component of a UI build looks
    callbacks.before_component(object())
    assert len([p for p in uen.extra_pages if p.name == "lora"]) == 2


def test_one_lora_page_keeps_the_only_one():
    import types

    ours = types.SimpleNamespace(name="lora", lora_engine=True)
    other, ti = types.SimpleNamespace(name="lora"), types.SimpleNamespace(name="textual inversion")
    assert page_mod.one_lora_page([ti, ours, other], builtin_cards=False) == [ti, ours]
    assert page_mod.one_lora_page([other, ti, ours], builtin_cards=True) == [other, ti]
    assert page_mod.one_lora_page([ti, ours], builtin_cards=True) == [ti, ours]  # nothing to show instead
    assert page_mod.one_lora_page([other], builtin_cards=False) == [other]


def _file(path, meta=None):
    save_file({"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1)},
              str(path), metadata=meta or {})


def test_paste_hook_maps_renamed_file_by_hash(tmp_path):
    _file(tmp_path / "new_name.safetensors")
    c, _ = make_network(tmp_path)
    entry = c.entry("new_name")
    short = c.short_hash(entry)
    params = {"Prompt": "a <lora:old name:0.7> b <lora:other:1>", "Lora hashes": f"old name: {short}, other: 0123456789ab"}
    notes = infotext.on_infotext_pasted(c, "", params)
    assert params["Prompt"] == "a <lora:new_name:0.7> b <lora:other:1>"
    assert len(notes) == 1 and "other" in notes[0]


def test_api_loras_answers_like_a1111(tmp_path):
    _file(tmp_path / "one.safetensors", {"ss_output_name": "One Alias"})
    c, _ = make_network(tmp_path)
    (item,) = api.list_loras(c)
    assert item["name"] == "one" and item["alias"] == "One Alias"
    assert item["path"] == str(tmp_path / "one.safetensors") and item["metadata"]["ss_output_name"] == "One Alias"
    assert json.dumps(api.list_loras(c))  # JSON-serialisable, as FastAPI needs


def test_prompt_names_are_what_the_cards_insert(tmp_path):
    """Autocomplete's list (``/lora-engine/v1/names``): the card's name (sub-folder path when stems
    collide), its weight (preferred weight, else our default-weight setting) and the alias to search by."""
    for sub in ("bench", "other"):
        (tmp_path / sub).mkdir()
        _file(tmp_path / sub / "lc_r1b.safetensors")
    _file(tmp_path / "moon.safetensors", {"ss_output_name": "Moonlight"})
    (tmp_path / "moon.json").write_text(json.dumps({"preferred weight": 0.6}))
    c, _ = make_network(tmp_path, lora_engine_default_weight=0.7, extra_networks_default_multiplier=0.9)
    names = api.prompt_names(c)
    assert names == [{"name": "moon", "alias": "Moonlight", "weight": "0.6"},
                     {"name": "bench/lc_r1b", "alias": "lc_r1b", "weight": "0.7"},
                     {"name": "other/lc_r1b", "alias": "lc_r1b", "weight": "0.7"}]
    lib = c.get_library()
    for n, e in zip(names, lib.entries):
        assert card_fields(e, lib.preferred_name(e), c.settings().default_weight, None)["tag"] == \
            f"<lora:{n['name']}:{n['weight']}>"
    c.builtin_cards = True  # tags handed to the built-in Lora: its cards insert alias/stem, A1111's multiplier
    assert [(n["name"], n["weight"]) for n in api.prompt_names(c)] == [("Moonlight", "0.6"), ("lc_r1b", "0.9"),
                                                                      ("lc_r1b", "0.9")]
    c.opts.values["lora_preferred_name"] = "Filename"
    assert api.prompt_names(c)[0]["name"] == "moon"
    assert json.dumps(names)


def test_editor_hash_row_shows_the_hash_once_a_generation_computed_it(tmp_path):
    from extension.metadata_editor import table_rows

    _file(tmp_path / "h.safetensors")
    c, _ = make_network(tmp_path)
    e = c.entry("h")
    item = {"filename": e.path, "shorthash": ""}
    a1111_rows = [("Filename: ", "h.safetensors"), ("Hash: ", ""), ("Modified: ", "2024-01-01 00:00")]
    assert dict(table_rows(c, item, list(a1111_rows)))["Hash: "] == ""  # listing cards never hashes files
    _, _, short = c.resolve("h")  # what a generation with <lora:h> does
    rows = dict(table_rows(c, item, list(a1111_rows)))
    assert rows["Hash: "] == short and len(short) == 12 and item["shorthash"] == short
    assert rows["Alias: "] == "h" and rows["Filename: "] == "h.safetensors"


def test_settings_defaults_and_bad_values():
    s = Settings.from_opts(Opts({"lora_engine_mode": "bogus", "lora_engine_folders": " a ; ;b"}))
    assert s.mode == "automatic" and s.folders == ("a", "b") and s.warnings and not s.handover
    assert not s.force_foreign and s.max_strength == 100.0
    assert Settings.from_opts(Opts({"lora_engine_max_strength": "x"})).max_strength == 100.0
    assert Settings.from_opts(Opts({"lora_engine_max_strength": -20, "lora_engine_force_foreign": True})) \
        == Settings(max_strength=20.0, force_foreign=True)
    assert Settings.from_opts(None) == Settings()


def test_install_never_touches_torch_or_gradio():
    sys.path.insert(0, ROOT)
    import install

    assert install.missing(lambda mod: False) == ["safetensors>=0.3", "numpy"]
    assert install.missing(lambda mod: True) == []


def test_card_tag_uses_preferred_weight_activation_text_and_badges(tmp_path):
    _file(tmp_path / "c.safetensors")
    (tmp_path / "c.json").write_text(json.dumps({"preferred weight": 0.6, "activation text": "red hat"}))
    c, _ = make_network(tmp_path)
    e = c.entry("c")
    f = card_fields(e, "c", 1.0, "sdxl")
    assert f["tag"] == "<lora:c:0.6> red hat"
    sd1 = dataclasses.replace(e, architecture="sd1")
    assert card_fields(sd1, "c", 1.0, "sdxl")["description"].startswith("⚠ SD1 LoRA, the loaded model is SDXL")
    assert not card_fields(sd1, "c", 1.0, "sd1")["description"].startswith("⚠")
    (tmp_path / "c.json").unlink()
    assert card_fields(c.refresh() and c.entry("c"), "c", 0.8, None)["tag"] == "<lora:c:0.8>"


def test_denoiser_rows_follow_cfg_denoiser_layout():
    assert denoiser_rows(4, ("a", "b")) == [(0, False), (1, False), (0, True), (1, True)]
    assert denoiser_rows(5, ("x AND y", "z")) == [(0, False), (0, False), (1, False), (0, True), (1, True)]


def test_automatic_mode_follows_how_the_stack_changes():
    from extension.batch import BatchStacks, Use, Variant
    from extension.controller import ModeChooser
    from lora_engine.engine import Mode

    def batch(ident, per_image=False):
        uses = [Use(0, False)] + ([] if per_image else [Use(1, False)])
        return BatchStacks(2, (Variant(ident, None, "x", None, uses),), ("a", "b"), ("", ""), ())

    m = ModeChooser()
    seq = [m.choose("automatic", batch(i), "first", Mode.MERGED) for i in ("s", "s", "t", "u", "v", "v")]
    assert seq == [Mode.MERGED, Mode.MERGED, Mode.MERGED, Mode.ONTHEFLY, Mode.ONTHEFLY, Mode.MERGED]
    assert m.choose("automatic", batch("v", per_image=True), "first", Mode.MERGED) is Mode.ONTHEFLY
    assert m.choose("merged", batch("w", per_image=True), "first", Mode.MERGED) is Mode.MERGED
    assert m.choose("automatic", BatchStacks(1, (), ("a",), ("",), ()), "first", Mode.ONTHEFLY) is Mode.ONTHEFLY
    # over fp8 weights (the FP8 weight option) automatic is on the fly even for a static stack
    assert m.choose("automatic", batch("v"), "first", Mode.MERGED, quantized=True) is Mode.ONTHEFLY
    assert m.choose("merged", batch("v"), "first", Mode.MERGED, quantized=True) is Mode.MERGED


def test_text_encoder_calls_are_routed_to_their_image():
    from extension.runtime import ModelRuntime

    route = ModelRuntime._image_of
    rt = type("R", (), {"notes": []})()
    prompts = ("a cat ", "a dog AND a bird", "x")
    assert route(rt, ["a cat "], prompts) == 0
    assert route(rt, ["a  cat"], prompts) == 0  # whitespace only
    assert route(rt, ["a bird"], prompts) == 1  # an AND part
    assert route(rt, ["a"], prompts) == 0 and rt.notes  # ambiguous: image 0, said so


def test_paste_hook_converts_addnet_fields_unless_the_builtin_does(tmp_path):
    _file(tmp_path / "old.safetensors")
    c, _ = make_network(tmp_path)
    fields = {"AddNet Module 1": "LoRA", "AddNet Model 1": "old(abcdef12)", "AddNet Weight A 1": "0.6"}
    params = {"Prompt": "a cat", **fields}
    infotext.on_infotext_pasted(c, "", params)
    assert params["Prompt"] == "a cat <lora:old:0.6>"
    c.builtin = object()
    params = {"Prompt": "a cat", **fields}
    infotext.on_infotext_pasted(c, "", params)
    assert params["Prompt"] == "a cat"


def test_metadata_editor_fields_round_trip_through_the_card(tmp_path):
    from extension.metadata_editor import extra_values, updated
    from extension.page import fresh_sidecars

    _file(tmp_path / "m.safetensors")
    c, _ = make_network(tmp_path)
    e = c.entry("m")
    assert extra_values({}) == ("", 0.0, "", "Unknown")
    assert extra_values({"preferred weight": "x", "sd version": "SD9"}) == ("", 0.0, "", "Unknown")
    meta = updated({"notes": "keep"}, "blue eyes", 0.7, "lowres", "SD1")
    (tmp_path / "m.json").write_text(json.dumps(meta))  # what the editor's save writes
    f = card_fields(fresh_sidecars(e), "m", 1.0, "sd1")
    assert f["tag"] == "<lora:m:0.7> blue eyes" and f["negative"] == "lowres" and meta["notes"] == "keep"
    assert extra_values(meta) == ("blue eyes", 0.7, "lowres", "SD1")


def test_lowvram_models_keep_lora_tensors_off_the_gpu(sd_model):
    """A1111 marks a model ``lowvram`` under --lowvram/--medvram: the engine then copies no LoRA tensors
    to the GPU to keep them there (it would with the whole model on the GPU)."""
    from extension.runtime import ModelRuntime

    assert ModelRuntime(sd_model).engine.device_factors is True
    sd_model.lowvram = True
    rt = ModelRuntime(sd_model)
    assert rt.engine.device_factors is False and rt.engine._patcher.device_factors is False
    rt.engine.set_mode("onthefly")
    assert rt.engine._patcher.device_factors is False
