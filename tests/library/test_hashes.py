"""Hashes against an independent computation: hashlib over bytes sliced here, and the
``sshs_model_hash`` real writers put in the metadata."""
from __future__ import annotations

import hashlib

import torch
from safetensors.torch import save, save_file

from lora_engine.library.hashes import hash_file, short_hash
from tests.library.conftest import write_lora


def _slices(path):
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return data, data[8 + n:]


def test_hashes_match_hashlib_on_sliced_bytes(tmp_path):
    path = write_lora(tmp_path / "a.safetensors", {"ss_output_name": "a"}, rank=4, numel=80_000)  # > 1.1 MiB
    data, tensors = _slices(path)
    assert len(data) > 0x110000
    h = hash_file(path)
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.addnet == hashlib.sha256(tensors).hexdigest()
    assert h.legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert short_hash(h.addnet, {}) == h.addnet[:12]
    for chunk in (4093, 65536 + 17, 1 << 22):  # header end and legacy window fall inside chunks
        assert hash_file(path, chunk_size=chunk) == h


def test_small_file_legacy_hash_is_the_empty_digest(tmp_path):
    h = hash_file(write_lora(tmp_path / "s.safetensors"))
    assert h.legacy == "e3b0c442" == hashlib.sha256(b"").hexdigest()[:8]


def test_addnet_ignores_metadata_but_sha256_does_not(tmp_path):
    a = hash_file(write_lora(tmp_path / "a.safetensors", {"ss_output_name": "one"}, seed=3))
    b = hash_file(write_lora(tmp_path / "b.safetensors", {"ss_output_name": "two", "x": "y" * 100}, seed=3))
    assert a.addnet == b.addnet and a.sha256 != b.sha256


def test_kohya_sshs_model_hash_is_the_addnet_hash(tmp_path):
    """sd-scripts re-serialises the state dict with only ss_* metadata and hashes the bytes after
    the header (``train_util.precalculate_safetensors_hashes``); done here with safetensors' own serialiser."""
    torch.manual_seed(0)
    sd = {"lora_unet_x.lora_down.weight": torch.randn(2, 8), "lora_unet_x.lora_up.weight": torch.randn(8, 2)}
    blob = save(sd, metadata={"ss_network_dim": "2"})
    n = int.from_bytes(blob[:8], "little")
    sshs = hashlib.sha256(blob[8 + n:]).hexdigest()
    path = tmp_path / "k.safetensors"
    save_file(sd, str(path), metadata={"sshs_model_hash": sshs, "ss_network_dim": "2", "modelspec.title": "t"})
    h = hash_file(path)
    assert h.addnet == sshs
    assert short_hash(h.addnet, {"sshs_model_hash": sshs}) == sshs[:12]


def test_lycoris_written_hash_is_used_as_is(tmp_path):
    """LyCORIS's kohya wrapper writes '0x' + its own digest; A1111 shows its first 12 characters."""
    from lycoris.utils import precalculate_safetensors_hashes

    torch.manual_seed(1)
    sd = {"lora_unet_x.hada_w1_a": torch.randn(8, 2), "lora_unet_x.hada_w1_b": torch.randn(2, 8),
          "lora_unet_x.hada_w2_a": torch.randn(8, 2), "lora_unet_x.hada_w2_b": torch.randn(2, 8)}
    meta = {"sshs_model_hash": precalculate_safetensors_hashes(sd)}
    path = tmp_path / "ly.safetensors"
    save_file(sd, str(path), metadata=meta)
    h = hash_file(path)
    assert meta["sshs_model_hash"].startswith("0x")
    assert short_hash(h.addnet, meta) == meta["sshs_model_hash"][:12] != h.addnet[:12]


def test_pickle_files_hash_whole_file(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, path)
    data = path.read_bytes()
    h = hash_file(path)
    assert h.addnet == h.sha256 == hashlib.sha256(data).hexdigest()


def test_truncated_safetensors_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10_000).to_bytes(8, "little") + b"{}")
    try:
        hash_file(path)
    except Exception as e:  # noqa: BLE001
        assert type(e).__name__ == "LoraFileError" and "bad.safetensors" in str(e) and "header" in str(e)
    else:
        raise AssertionError("no error for a truncated file")


def test_bogus_empty_digest_in_metadata_is_ignored(tmp_path):
    """ai-toolkit wrote sha256(b"") as sshs_model_hash into every file (ostris/ai-toolkit#130)."""
    empty = hashlib.sha256(b"").hexdigest()
    h = hash_file(write_lora(tmp_path / "t.safetensors", {"sshs_model_hash": empty}))
    assert short_hash(h.addnet, {"sshs_model_hash": empty}) == h.addnet[:12] != empty[:12]
