"""Every path field of the web UI, through the functions its callbacks call: absolute paths, ``..``,
symlinks that lead out of the configured folders and non-safetensors files are refused with one
line that holds none of the file's bytes, before the file is opened; nothing is written outside.

The files outside are real LoRAs and a fake ``/etc/shadow``, so a field that read them would succeed
(or echo them) and the test would see it."""
from __future__ import annotations

import os
import struct

import pytest

from lora_engine.apps.ui import tool_ops
from tests.fixtures.files.ui import write_lora

SECRET = b"root:$6$TOPSECRET.hash:19000:0:99999:7:::\n"
LEAKS = ("TOPSECRET", "root:$6$", str(struct.unpack("<Q", SECRET[:8])[0]), SECRET[:8].hex())


@pytest.fixture
def world(ctx, lora_root, tmp_path):
    """Outside files, links out of every kind of folder, and a non-safetensors file in each."""
    out = tmp_path / "outside"
    write_lora(out / "secret.safetensors", seed=9)
    (out / "shadow").write_bytes(SECRET)
    (out / "images").mkdir()
    (out / "ckpt").mkdir()
    models, datasets = tmp_path / "models", tmp_path / "datasets"
    for folder in (lora_root, models, datasets):
        os.symlink(out, os.path.join(folder, "linkdir"))
        os.symlink(out / "secret.safetensors", os.path.join(folder, "link_out.safetensors"))
        with open(os.path.join(folder, "notes.txt"), "wb") as fh:
            fh.write(SECRET)
    (models / "okfolder").mkdir()  # a valid model folder name, so the field after it is the one checked
    (datasets / "imgs").mkdir()
    with open(os.path.join(lora_root, "fake.safetensors"), "wb") as fh:  # inside, wearing the extension
        fh.write(SECRET)
    ctx.scan()
    return out


def _snapshot(folder):
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.lstat(os.path.join(d, f)).st_mtime_ns)
                  for d, _, fs in os.walk(folder) for f in fs)


def _refused(text: str, why=("refused", "not found")) -> None:
    """One error line, from the path rule (not from a tool that went on to read something)."""
    assert text.startswith("error: ") and "\n" not in text, text
    assert any(w in text for w in why), text
    assert not any(leak in text for leak in LEAKS), text


def _reads(outside) -> list[str]:
    return [str(outside / "secret.safetensors"), "../outside/secret.safetensors", "sub/../../outside/secret",
            "link_out.safetensors", "linkdir/secret.safetensors", "linkdir/shadow", "notes.txt",
            "..\\outside\\secret.safetensors", "C:\\outside\\secret.safetensors", "x\x00y"]


def _writes(outside) -> list[str]:
    return [str(outside / "new.safetensors"), "../outside/new", "linkdir/new", "link_out.safetensors",
            "..\\outside\\new", "no_such_folder/new"]


def test_every_read_field_refuses_escapes(ctx, world):
    from lora_engine.apps.ui.train_session import TrainForm, TrainSession

    before = _snapshot(world)
    session = ctx.generate_session()
    for bad in _reads(world):
        _refused(tool_ops.inspect_op(ctx, bad))
        _refused(tool_ops.resize_op(ctx, bad, "r_out", 2))
        _refused(tool_ops.merge_op(ctx, f"{bad}:1\ngreen_things:1", "m_out"))
        _refused(tool_ops.convert_op(ctx, bad, "c_out", "peft"))
        _refused(tool_ops.extract_op(ctx, bad, "link_out.safetensors", "e_out", 4))
        _refused(tool_ops.extract_op(ctx, "okfolder", bad, "e_out", 4))
        _refused(tool_ops.bake_op(ctx, bad, "green_things:1", "b_out"))
        _refused(tool_ops.bake_op(ctx, "okfolder", f"{bad}:1", "b_out"))
        for form in (TrainForm(bad, "imgs", "t_out"), TrainForm("demo", bad, "t_out"),
                     TrainForm("demo", "imgs", "t_out", tokenizer=bad)):
            msg = TrainSession(ctx).start(form)
            _refused(msg)
        img, msg = session.run("a circle", [bad], "0, 1", 0, 1, 3.0)
        assert img is None
        _refused(msg)
    assert _snapshot(world) == before
    assert session.runner is None  # refused before any model was loaded
    assert not {"r_out", "m_out", "c_out", "e_out", "b_out", "t_out"} & {os.path.splitext(f)[0] for f in
                                                                        os.listdir(ctx.config.out_dir)}


def test_every_output_field_refuses_escapes_and_existing_files(ctx, world, lora_root):
    from lora_engine.apps.ui.train_session import TrainForm, TrainSession

    before = _snapshot(world)
    for bad in _writes(world) + [".lora-engine-cache.json", "green_things.json", "x.png",  # library sidecars
                                 "purple_style", "purple_style.safetensors"]:  # the last two exist
        why = ("output name", "exists")  # refused by the output rule, not by a tool that went on
        _refused(tool_ops.resize_op(ctx, "green_things", bad, 2, overwrite=True), why)
        _refused(tool_ops.merge_op(ctx, "green_things:1", bad, overwrite=True), why)
        _refused(tool_ops.convert_op(ctx, "green_things", bad, "kohya", overwrite=True), why)
        if bad != "purple_style":  # a PEFT output is a folder: "purple_style" is a new name for one
            _refused(tool_ops.convert_op(ctx, "green_things", bad, "peft", overwrite=True), why)
        _refused(tool_ops.extract_op(ctx, "okfolder", "okfolder", bad, 4, overwrite=True), why)
        if bad != "purple_style":  # the same for a bake output (a file or a folder, named as typed)
            _refused(tool_ops.bake_op(ctx, "okfolder", "green_things", bad, overwrite=True), why)
        _refused(TrainSession(ctx).start(TrainForm("demo", "imgs", bad)), why)
    assert _snapshot(world) == before
    assert "does not replace files" in tool_ops.resize_op(ctx, "green_things", "purple_style", 2, overwrite=True)


def test_unreadable_file_inside_shows_no_bytes_and_library_skips_links_out(ctx, world, lora_root):
    _refused(tool_ops.inspect_op(ctx, "fake"), ("not a valid safetensors file",))
    _refused(tool_ops.resize_op(ctx, "fake.safetensors", "r_out", 2), ("not a valid safetensors file",))
    keys = ctx.choices()
    assert "fake" in keys and "link_out" not in keys and not any(k.startswith("linkdir/") for k in keys)
    fake = ctx.entry("fake")
    assert fake.unreadable and len(fake.problems) == 1 and not any(leak in fake.problems[0] for leak in LEAKS)
    report = ctx.scan()
    assert sum("links outside" in w for w in report.warnings) == 2  # the linked file and the linked folder


def test_names_inside_the_folders_work(ctx, lora_root, tmp_path):
    assert ctx.lora_path("sub/big_one.safetensors") == os.path.join(lora_root, "sub", "big_one.safetensors")
    assert ctx.lora_path("PurpleStyle") == os.path.join(lora_root, "purple_style.safetensors")  # alias
    assert ctx.output_path("a") == os.path.join(lora_root, "a.safetensors")
    assert ctx.output_path("sub/b") == os.path.join(lora_root, "sub", "b.safetensors")
    os.makedirs(tmp_path / "models" / "diffusers_folder")
    assert ctx.model_path("diffusers_folder") == str(tmp_path / "models" / "diffusers_folder")
    assert ctx.model_path("demo") == "demo"
    os.makedirs(tmp_path / "datasets" / "set1")
    assert ctx.dataset_path("set1") == str(tmp_path / "datasets" / "set1")


def test_overwrite_is_the_servers_rule(lora_root, tmp_path):
    from lora_engine.apps.ui.context import UiConfig, UiContext

    ctx = UiContext(UiConfig((lora_root,), allow_overwrite=True))
    ctx.scan()
    assert "exists (tick overwrite" in tool_ops.resize_op(ctx, "green_things", "purple_style", 2)
    assert tool_ops.resize_op(ctx, "green_things", "purple_style", 2, overwrite=True).startswith("wrote ")
    os.symlink(tmp_path / "elsewhere.safetensors", os.path.join(lora_root, "dangling.safetensors"))
    _refused(tool_ops.resize_op(ctx, "green_things", "dangling", 2, overwrite=True))
    assert not (tmp_path / "elsewhere.safetensors").exists()
