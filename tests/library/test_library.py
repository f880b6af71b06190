"""The library on real folders: resolution, collisions, aliases, escapes, sidecars, cache."""
from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from lora_engine.errors import NameResolutionError, OperationCancelled
from lora_engine.library.index import LoraLibrary
from tests.library.conftest import write_lora


def scan(root, **kw):
    lib = LoraLibrary([root], **kw)
    return lib, lib.scan()


def test_resolve_by_stem_path_alias_and_hash(lora_dir):
    write_lora(lora_dir / "style" / "inkwash.safetensors", {"ss_output_name": "InkWash_v2"}, seed=1)
    write_lora(lora_dir / "chars" / "Alice.safetensors", seed=2)
    lib, rep = scan(lora_dir)
    assert rep.files == 2 and rep.read == 2
    ink = lib.resolve("inkwash")
    assert ink.key == "style/inkwash" and ink.alias == "InkWash_v2"
    assert lib.resolve("style/inkwash") is ink and lib.resolve("style\\inkwash.safetensors") is ink
    assert lib.resolve("InkWash_v2") is ink and lib.resolve("inkwash_V2") is ink       # alias, any case
    assert lib.resolve("alice") is lib.resolve("Alice") is lib.resolve("CHARS/ALICE")
    assert lib.resolve(ink.short_hash) is ink and lib.resolve(ink.sha256[:10].upper()) is ink
    with pytest.raises(NameResolutionError, match="'nobody' not found"):
        lib.resolve("nobody")


def test_collisions_are_reported_never_silently_resolved(lora_dir):
    a = write_lora(lora_dir / "a" / "twin.safetensors", seed=1)
    b = write_lora(lora_dir / "b" / "Twin.safetensors", seed=2)
    write_lora(lora_dir / "other.safetensors", {"ss_output_name": "twin"}, seed=3)
    lib, _ = scan(lora_dir)
    with pytest.raises(NameResolutionError, match="ambiguous") as ei:
        lib.resolve("TWIN")  # only case-insensitive matches, and two of them
    assert a in str(ei.value) and b in str(ei.value)
    assert lib.resolve("twin").path == a          # exact stem beats others (and beats the alias)
    assert lib.resolve("Twin").path == b
    assert lib.resolve("b/twin").path == b
    kinds = {(c.kind, c.name) for c in lib.collisions()}
    assert ("stem", "twin") in kinds and ("alias", "twin") in kinds
    assert lib.preferred_name(lib.resolve("b/Twin")) == "Twin"


def test_same_key_in_two_folders_collides(tmp_path):
    one = write_lora(tmp_path / "one" / "x.safetensors", seed=1)
    two = write_lora(tmp_path / "two" / "x.safetensors", seed=2)
    lib = LoraLibrary([tmp_path / "one", tmp_path / "two"], cache_path=tmp_path / "cache.json")
    lib.scan()
    with pytest.raises(NameResolutionError, match="ambiguous"):
        lib.resolve("x")
    assert {c.kind for c in lib.collisions()} == {"path", "stem"}
    assert lib.resolve(lib.entries[1].short_hash).path == two and lib.entries[0].path == one


def test_identical_copies_resolve_by_hash(lora_dir):
    write_lora(lora_dir / "a" / "x.safetensors", {"ss_output_name": "first"}, seed=5)
    write_lora(lora_dir / "b" / "y.safetensors", seed=5)   # same tensors, other metadata
    lib, _ = scan(lora_dir)
    e = lib.resolve("y")
    assert lib.resolve(e.short_hash) in lib.entries  # same tensor data: either copy is the same LoRA


@pytest.mark.parametrize("name", ["../outside", "a/../../outside", "..\\outside", "/etc/passwd", "\\\\server\\share",
                                  "C:\\Windows\\x", "c:x", "sub/..", "x\x00y", "", "   "])
def test_escapes_refused(lora_dir, tmp_path, name):
    write_lora(tmp_path / "outside.safetensors")
    write_lora(lora_dir / "sub" / "inside.safetensors")
    lib, _ = scan(lora_dir)
    with pytest.raises(NameResolutionError):
        lib.resolve(name)


def test_hidden_folders_symlink_loops_and_other_files(lora_dir):
    write_lora(lora_dir / ".hidden" / "h.safetensors", seed=1)
    write_lora(lora_dir / "v" / "v.safetensors", seed=2)
    (lora_dir / "v" / "notes.md").write_text("x")
    os.symlink(lora_dir, lora_dir / "v" / "loop")
    write_lora(lora_dir / ".dot.safetensors", seed=3)
    lib, rep = scan(lora_dir)
    assert sorted(e.key for e in lib.entries) == [".dot", ".hidden/h", "v/v"]
    lib2, _ = scan(lora_dir, include_hidden=False, use_cache=False)
    assert [e.key for e in lib2.entries] == ["v/v"]


def test_per_file_record_and_sidecars(lora_dir):
    p = write_lora(lora_dir / "xl.safetensors", {"ss_output_name": "XL"}, te2=True)
    (lora_dir / "xl.preview.png").write_bytes(b"\x89PNG")
    (lora_dir / "xl.json").write_text(json.dumps({"activation text": "ink style", "preferred weight": 0.8,
                                                  "negative text": "blurry", "notes": "n", "sd version": "Unknown"}))
    (lora_dir / "xl.txt").write_text("A description")
    write_lora(lora_dir / "plain.safetensors", seed=3)
    (lora_dir / "plain.json").write_text("{broken")
    lib, _ = scan(lora_dir)
    e = lib.resolve("xl")
    st = os.stat(p)
    assert (e.size, e.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert e.metadata == {"ss_output_name": "XL"}
    assert e.sha256 == hashlib.sha256(open(p, "rb").read()).hexdigest()
    assert e.format == "kohya" and e.architecture == "sdxl" and e.sd_version == "SDXL"
    assert e.sidecars.preview.endswith("xl.preview.png")
    assert e.sidecars.user_metadata["activation text"] == "ink style" and e.sidecars.description == "A description"
    plain = lib.resolve("plain")
    assert any("plain.json" in p and "unreadable user metadata" in p for p in plain.problems)


def test_user_sd_version_overrides(lora_dir):
    write_lora(lora_dir / "a.safetensors")
    (lora_dir / "a.json").write_text(json.dumps({"sd version": "SD1"}))
    lib, _ = scan(lora_dir)
    assert lib.resolve("a").sd_version == "SD1"


def test_broken_file_is_listed_with_its_problem(lora_dir):
    (lora_dir / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    write_lora(lora_dir / "ok.safetensors")
    lib, rep = scan(lora_dir)
    junk = lib.resolve("junk")
    assert junk.problems and "junk.safetensors" in junk.problems[0]
    assert lib.resolve("ok").problems == ()


def test_cache_survives_restart_and_invalidates_on_change(lora_dir):
    a = write_lora(lora_dir / "a.safetensors", seed=1)
    write_lora(lora_dir / "b.safetensors", seed=2)
    lib, rep = scan(lora_dir)
    assert (rep.read, rep.reused) == (2, 0)
    before = {e.key: e.addnet_hash for e in lib.entries}

    lib2, rep2 = scan(lora_dir)                      # a new process: nothing re-read
    assert (rep2.read, rep2.reused) == (0, 2)
    assert {e.key: e.addnet_hash for e in lib2.entries} == before

    write_lora(a, seed=9)                            # changed content (size/mtime change)
    os.utime(a, ns=(os.stat(a).st_atime_ns, os.stat(a).st_mtime_ns + 10_000_000))
    os.remove(lora_dir / "b.safetensors")
    rep3 = lib2.refresh()
    assert (rep3.read, rep3.reused, rep3.removed) == (1, 0, 1)
    data = open(a, "rb").read()
    n = int.from_bytes(data[:8], "little")
    assert lib2.resolve("a").addnet_hash == hashlib.sha256(data[8 + n:]).hexdigest() != before["a"]


def test_cache_keyed_by_size_and_mtime(lora_dir):
    a = write_lora(lora_dir / "a.safetensors", seed=1)
    st = os.stat(a)
    scan(lora_dir)
    write_lora(a, seed=2)                            # same size: only the mtime tells
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    lib, rep = scan(lora_dir)
    assert rep.read == 0                             # trusted, as documented: path+size+mtime
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert lib.refresh().read == 1


def test_corrupt_cache_is_rebuilt_with_a_warning(lora_dir):
    write_lora(lora_dir / "a.safetensors")
    lib, _ = scan(lora_dir)
    cache = lib.cache.path
    open(cache, "w").write("{not json")
    lib2, rep = scan(lora_dir)
    assert rep.read == 1 and any("cache unreadable" in w for w in rep.warnings)
    assert json.load(open(cache))["version"] == 1


def test_unwritable_cache_folder_still_lists(lora_dir, tmp_path):
    write_lora(lora_dir / "a.safetensors")
    lib, rep = scan(lora_dir, cache_path=tmp_path / "missing_dir" / "c.json")
    assert rep.files == 1 and any("cannot write hash cache" in w for w in rep.warnings)


def test_progress_and_cancel(lora_dir):
    for i in range(5):
        write_lora(lora_dir / f"f{i}.safetensors", seed=i)
    seen = []

    def stop_at_3(i, path):
        seen.append(path)
        if i == 3:
            raise KeyboardInterrupt

    lib = LoraLibrary([lora_dir])
    with pytest.raises(KeyboardInterrupt):
        lib.scan(progress=stop_at_3)
    assert len(seen) == 4
    assert lib.scan().reused == 3                    # what was read before the cancel was kept

    flag = threading.Event()
    flag.set()
    with pytest.raises(OperationCancelled, match="after 0 files"):
        LoraLibrary([lora_dir]).scan(cancel=flag)


def test_rescan_finds_new_files_and_metadata_only_mode(lora_dir):
    write_lora(lora_dir / "a.safetensors", {"ssmd_cover_images": "[\"AAAA\"]", "sshs_model_hash": "f" * 64})
    lib, _ = scan(lora_dir, hash_files=False)
    a = lib.resolve("a")
    assert a.sha256 is None and a.short_hash == "f" * 12           # short hash from metadata, no read
    assert a.has_cover_image and "ssmd_cover_images" not in a.metadata
    write_lora(lora_dir / "late.safetensors", seed=4)
    with pytest.raises(NameResolutionError):
        lib.resolve("late")
    assert lib.resolve("late", rescan_if_missing=True).stem == "late"
    lib2, rep = scan(lora_dir)                                       # hashing on: files without hashes re-read
    assert rep.read == 2 and all(e.sha256 for e in lib2.entries)


def test_summaries_can_be_skipped_and_filled_in_later(lora_dir):
    write_lora(lora_dir / "xl.safetensors", te2=True)
    lib, rep = scan(lora_dir, summarize_files=False)
    assert lib.resolve("xl").architecture == "unknown" and lib.resolve("xl").short_hash
    lib2, rep2 = scan(lora_dir)
    assert rep2.read == 1 and lib2.resolve("xl").architecture == "sdxl"
    assert scan(lora_dir, summarize_files=False)[1].read == 0    # a fuller record serves a lighter scan


def test_shared_cache_keeps_other_libraries_files(tmp_path):
    write_lora(tmp_path / "A" / "a.safetensors", seed=1)
    write_lora(tmp_path / "B" / "b.safetensors", seed=2)
    cache = tmp_path / "shared.json"
    LoraLibrary([tmp_path / "A", tmp_path / "B"], cache_path=cache).scan()
    assert LoraLibrary([tmp_path / "A"], cache_path=cache).scan().removed == 0
    assert LoraLibrary([tmp_path / "A", tmp_path / "B"], cache_path=cache).scan().read == 0


def test_files_with_the_bogus_empty_hash_stay_distinct(lora_dir):
    empty = hashlib.sha256(b"").hexdigest()
    write_lora(lora_dir / "one.safetensors", {"sshs_model_hash": empty}, seed=1)
    write_lora(lora_dir / "two.safetensors", {"sshs_model_hash": empty}, seed=2)
    lib, _ = scan(lora_dir)
    one, two = lib.resolve("one"), lib.resolve("two")
    assert one.short_hash != two.short_hash and lib.resolve(two.short_hash) is two
    assert any("hash of no bytes" in p for p in one.problems)


def test_dit_loras_are_labelled_by_family_and_filtered(lora_dir):
    """A kohya Flux LoRA reads as "Flux.1" on the cards, and the web UI's architecture filter finds it."""
    from lora_engine.apps.ui.cards import ARCH_FILTERS, filter_entries
    from tests.fixtures.files.flux import flux_modules, native_lora, write
    from tests.fixtures.models.flux import flux_model, native_state

    shapes = {k: tuple(v.shape) for k, v in native_state(flux_model(meta=True)).items()}
    write(native_lora(shapes, seed=1, modules=flux_modules(shapes)), lora_dir / "fluxy.safetensors")
    write_lora(lora_dir / "old.safetensors", seed=2)
    lib, _ = scan(lora_dir)
    e = lib.resolve("fluxy")
    assert e.architecture == "flux" and e.sd_version == "Flux.1"
    assert "Flux.1" in ARCH_FILTERS
    assert [x.stem for x in filter_entries(lib.entries, "", "Flux.1")] == ["fluxy"]
    assert "fluxy" not in [x.stem for x in filter_entries(lib.entries, "", "SD1")]
