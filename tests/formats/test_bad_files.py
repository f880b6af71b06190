"""Bad input: every case gives ONE clear LoraFileError (or subclass) naming the file and the problem,
with no traceback chained from inside torch/json, harms nothing, and `lora-engine inspect` exits
non-zero with a one-line error."""
from __future__ import annotations

import json
import logging
import os
import shlex
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora_engine.apps.cli import main as cli_main
from lora_engine.errors import AdapterShapeError, LoraFileError, UnsafeFileError
from lora_engine.formats import load_lora

# (name, out, in) of a few real SD1 UNet/TE linears, small enough to stay fast.
MODULES = [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32),
           ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 32, 48),
           ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 24, 24)]


def _kohya(rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, o, i in MODULES:
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, i, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(o, rank, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return sd


def _write(tmp_path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _real_file(tmp_path) -> str:
    p = tmp_path / "real.safetensors"
    save_file(_kohya(), str(p), metadata={"ss_network_dim": "4"})
    return str(p)


def _header_file(tmp_path, name: str, header, data: bytes) -> str:
    raw = json.dumps(header).encode()
    return _write(tmp_path, name, struct.pack("<Q", len(raw)) + raw + data)


def _expect(path: str, exc=LoraFileError, *words: str) -> LoraFileError:
    with pytest.raises(exc) as info:
        load_lora(path)
    e = info.value
    msg = str(e)
    # names the file (or, for a PEFT folder, the file inside it that is wrong)
    assert msg.startswith(e.path + ": ") and e.path.startswith(os.fspath(path)), msg
    assert "\n" not in msg and len(msg) < 400, msg
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), "traceback chained into the error"
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    return e


def _bad_cases(tmp_path) -> dict[str, tuple[str, type, tuple[str, ...]]]:
    """name -> (path, expected exception, words the message must contain)."""
    real = open(_real_file(tmp_path), "rb").read()
    (n,) = struct.unpack("<Q", real[:8])
    cut = 8 + n + (len(real) - 8 - n) // 2  # the middle of the data region
    entry = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    return {
        "truncated": (_write(tmp_path, "truncated.safetensors", real[:cut]), LoraFileError, ("truncated",)),
        "truncated-header": (_write(tmp_path, "cut-header.safetensors", real[: 8 + n // 2]), LoraFileError,
                             ("header",)),
        "garbage-header": (_write(tmp_path, "garbage.safetensors", struct.pack("<Q", 40) + b"\x00\xff{not json" * 4
                                  + b"x" * 100), LoraFileError, ("header",)),
        "absurd-header-length": (_write(tmp_path, "absurd.safetensors", struct.pack("<Q", 2 ** 62) + b"{}" * 50),
                                 LoraFileError, ("header claims",)),
        "offsets-outside": (_header_file(tmp_path, "outside.safetensors",
                                         {"lora_unet_x.lora_down.weight": {**entry, "data_offsets": [4096, 4160]}},
                                         b"\0" * 64), LoraFileError, ("lora_unet_x.lora_down.weight",)),
        "offsets-vs-shape": (_header_file(tmp_path, "mismatch.safetensors",
                                          {"lora_unet_x.lora_down.weight": {**entry, "data_offsets": [0, 8]}},
                                          b"\0" * 64), LoraFileError, ("needs 64",)),
        "empty": (_write(tmp_path, "empty.safetensors", b""), LoraFileError, ("empty",)),
        "empty-pt": (_write(tmp_path, "empty.pt", b""), LoraFileError, ("empty",)),
        "tiny": (_write(tmp_path, "tiny.safetensors", b"\x01\x02\x03"), LoraFileError, ("truncated",)),
        "garbage-pt": (_write(tmp_path, "garbage.pt", bytes(range(13, 256)) * 3), LoraFileError, ("checkpoint",)),
        "no-lora-keys": (_no_lora_keys(tmp_path), LoraFileError, ("not a LoRA",)),
        "missing": (str(tmp_path / "does-not-exist.safetensors"), LoraFileError, ("no such file",)),
        "bad-dtype": (_header_file(tmp_path, "dtype.safetensors",
                                   {"lora_unet_x.lora_down.weight": {**entry, "dtype": "Q4_K"}}, b"\0" * 64),
                      LoraFileError, ("unsupported dtype",)),
        "header-not-object": (_header_file(tmp_path, "list.safetensors", [1, 2, 3], b""), LoraFileError,
                              ("not a JSON object",)),
        "peft-bad-config": (_peft_bad_config(tmp_path), LoraFileError, ("adapter_config.json",)),
        "all-nonfinite": (_all_nonfinite(tmp_path), AdapterShapeError, ("no usable module", "NaN/Inf")),
        "none-chain": (_none_chain(tmp_path), AdapterShapeError, ("no usable module", "do not chain", "1 more")),
    }


def _peft_bad_config(tmp_path) -> str:
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(_kohya(), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    return str(folder)


def _all_nonfinite(tmp_path) -> str:
    sd = {k: (v * float("nan") if k.endswith("up.weight") else v) for k, v in _kohya().items()}
    path = str(tmp_path / "allnan.safetensors")
    save_file(sd, path)
    return path


def _none_chain(tmp_path) -> str:
    """Two modules, neither usable: up's rank 3 vs down's rank 4, and a down without an up."""
    bad = MODULES[0][0]
    sd = {f"{bad}.lora_down.weight": torch.randn(4, MODULES[0][2]), f"{bad}.lora_up.weight": torch.randn(MODULES[0][1], 3),
          f"{bad}_2.lora_down.weight": torch.randn(4, 8)}
    path = str(tmp_path / "allbad.safetensors")
    save_file(sd, path)
    return path


def _no_lora_keys(tmp_path) -> str:
    p = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.bias": torch.zeros(4), "foo": torch.zeros(1)}, str(p))
    return str(p)


CASES = ["truncated", "truncated-header", "garbage-header", "absurd-header-length", "offsets-outside",
         "offsets-vs-shape", "empty", "empty-pt", "tiny", "garbage-pt", "no-lora-keys", "missing", "bad-dtype",
         "header-not-object", "peft-bad-config", "all-nonfinite", "none-chain"]


@pytest.mark.parametrize("case", CASES)
def test_bad_file_one_clear_error(tmp_path, case):
    path, exc, words = _bad_cases(tmp_path)[case]
    _expect(path, exc, *words)


@pytest.mark.parametrize("case", CASES)
def test_inspect_bad_file_exits_nonzero_one_line(tmp_path, capsys, case):
    path, _, words = _bad_cases(tmp_path)[case]
    for extra in ([], ["--json"]):
        rc = cli_main(["inspect", path, *extra])
        out, err = capsys.readouterr()
        assert rc != 0
        assert "Traceback" not in out + err
        if extra:
            (s,) = json.loads(out)
            assert s["error"] and "\n" not in s["error"] and path in s["error"]
        else:
            lines = [ln for ln in (out + err).splitlines() if ln.strip()]
            assert len(lines) == 1, lines
            assert path in lines[0] and all(w.lower() in lines[0].lower() for w in words), lines[0]


class _Payload:
    """A pickle that, when unpickled, creates ``marker`` through ``how``."""

    def __init__(self, marker: str, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        import builtins
        import subprocess

        if self.how == "os.system":
            return os.system, (f"touch {shlex.quote(self.marker)}",)
        if self.how == "exec":
            return builtins.exec, (f"open({self.marker!r}, 'w').close()",)
        return subprocess.call, (["touch", self.marker],)


@pytest.mark.parametrize("payload,word", [("os.system", "system"), ("exec", "exec"), ("subprocess", "call")])
@pytest.mark.parametrize("how", ["zip", "legacy", "raw-pickle"])
def test_code_executing_pickle_is_refused_and_does_not_run(tmp_path, capsys, how, payload, word):
    import pickle

    marker = str(tmp_path / "PWNED")
    obj = {"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "x": _Payload(marker, payload)}
    path = str(tmp_path / "evil.pt")
    if how == "zip":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    _expect(path, UnsafeFileError, "refused", word)
    assert not os.path.exists(marker), "the payload ran"
    rc = cli_main(["inspect", path])
    out = capsys.readouterr().out
    assert rc != 0 and not os.path.exists(marker)
    assert len(out.strip().splitlines()) == 1 and "refused" in out


@pytest.mark.parametrize("legacy", [False, True])
def test_plain_tensor_pickle_is_accepted(tmp_path, legacy):
    sd = _kohya()
    path = str(tmp_path / "plain.pt")
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    lf = load_lora(path)
    ref = load_lora(_real_file(tmp_path))
    assert set(lf.modules) == set(ref.modules) == {m[0] for m in MODULES}
    for name, ma in lf.modules.items():
        w = torch.zeros(ma.adapter.natural_shape())
        assert torch.equal(ma.adapter.delta(w).weight, ref.modules[name].adapter.delta(w).weight)


def test_truncated_pickle(tmp_path):
    path = str(tmp_path / "ok.pt")
    torch.save(_kohya(), path, _use_new_zipfile_serialization=False)
    data = open(path, "rb").read()
    cut = _write(tmp_path, "cut.pt", data[: len(data) // 2])
    _expect(cut, LoraFileError, "corrupt")
    zpath = str(tmp_path / "okz.pt")
    torch.save(_kohya(), zpath)
    data = open(zpath, "rb").read()
    _expect(_write(tmp_path, "cutz.pt", data[: len(data) // 2]), LoraFileError, "corrupt")


def test_nan_inf_modules_are_skipped_with_a_warning(tmp_path, caplog, capsys):
    sd = _kohya()
    sd[f"{MODULES[0][0]}.lora_up.weight"][1, 2] = float("nan")
    sd[f"{MODULES[1][0]}.lora_down.weight"][0, 0] = float("inf")
    path = str(tmp_path / "nan.safetensors")
    save_file({k: v.half() for k, v in sd.items()}, path)
    with caplog.at_level(logging.WARNING, logger="lora_engine"):
        lf = load_lora(path)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and path in warned[0] and "NaN/Inf" in warned[0], warned
    assert set(lf.modules) == {MODULES[2][0]}
    assert sorted(p.split(":")[0] for p in lf.problems) == sorted([MODULES[0][0], MODULES[1][0]])
    assert all("NaN/Inf" in p for p in lf.problems)
    rc = cli_main(["inspect", path, "--json"])
    assert rc == 0  # readable: the problems are listed, not fatal
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["modules"] == 1 and len(summary["problems"]) == 2 and "NaN/Inf" in summary["warnings"][0]


def test_shapes_that_do_not_chain(tmp_path):
    sd = _kohya()
    bad = MODULES[0][0]
    sd[f"{bad}.lora_up.weight"] = torch.randn(MODULES[0][1], 3)  # rank 3 vs down's rank 4
    path = str(tmp_path / "chain.safetensors")
    save_file(sd, path)
    lf = load_lora(path)
    assert bad not in lf.modules and len(lf.modules) == 2
    assert len(lf.problems) == 1 and lf.problems[0].startswith(bad) and "do not chain" in lf.problems[0]

