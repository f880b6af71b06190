"""The tool subcommands end to end through ``lora_engine.apps.cli.main`` (files on disk, real parsing).
The numerics are tested in the other files here; these check wiring, output files, errors, exit codes."""
from __future__ import annotations

import os
import stat

import torch
from safetensors.torch import load_file, save_file

from lora_engine.apps.cli import main
from lora_engine.apps.cli.bake_cmd import parse_lora
from lora_engine.syntax.file_weights import split_weights
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from tests.fixtures.models.hosts import a1111_root
from tests.fixtures.models.tiny_sd import TinySD
from tests.fixtures.files.writers import deltas, lycoris_file


def test_weight_specs():
    assert split_weights("a.safetensors:0.5", 1) == ("a.safetensors", [0.5])
    assert split_weights("C:\\loras\\a.safetensors", 1) == ("C:\\loras\\a.safetensors", [])
    assert split_weights("dir:x/a.safetensors:-1:0.25", 2) == ("dir:x/a.safetensors", [-1.0, 0.25])
    assert (parse_lora("a:0.5").te, parse_lora("a:0.5").unet) == (0.5, 0.5)
    assert (parse_lora("a:0.5:-1").te, parse_lora("a:0.5:-1").unet) == (0.5, -1.0)


def test_merge_resize_convert_commands(tmp_path, capsys):
    a = lycoris_file(tmp_path / "a.safetensors", seed=1)
    b = lycoris_file(tmp_path / "b.safetensors", seed=2)
    assert main(["merge", f"{a}:0.5", f"{b}:-1", "-o", str(tmp_path / "m.safetensors"), "--quiet"]) == 0
    m = deltas(load_lora(tmp_path / "m.safetensors"))
    da, db = deltas(load_lora(a)), deltas(load_lora(b))
    name = next(iter(da))
    torch.testing.assert_close(m[name], 0.5 * da[name] - db[name], rtol=1e-5, atol=1e-6)
    assert main(["resize", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "r.safetensors"), "--rank", "3",
                 "--method", "sv_fro", "--param", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "retained Frobenius" in out and out.count("rank 8 -> ") >= 10
    assert main(["convert", str(tmp_path / "r.safetensors"), "-o", str(tmp_path / "p"), "--to", "peft"]) == 0
    assert (tmp_path / "p" / "adapter_config.json").exists()


def test_extract_and_bake_commands(tmp_path, capsys):
    state = {k: v.detach().clone().contiguous() for k, v in a1111_root(TinySD.build("sd1")).state_dict().items()}
    keymap = build_keymap({k: tuple(v.shape) for k, v in state.items()})
    tuned = dict(state)
    t = keymap.lookup("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
    tuned[t.weight_key] = state[t.weight_key] + torch.ones(t.shape) * 0.01
    save_file(state, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    assert main(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                 "-o", str(tmp_path / "x.safetensors"), "--rank", "2", "--quiet"]) == 0
    assert list(load_lora(tmp_path / "x.safetensors").modules) == \
        ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"]
    assert main(["bake", str(tmp_path / "base.safetensors"), "--lora", f"{tmp_path / 'x.safetensors'}:1:2",
                 "-o", str(tmp_path / "baked.safetensors"), "--quiet"]) == 0
    baked = load_file(str(tmp_path / "baked.safetensors"))
    torch.testing.assert_close(baked[t.weight_key], state[t.weight_key] + 0.02, rtol=1e-5, atol=1e-6)
    assert "1 tensors changed" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    assert main(["resize", str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "o.safetensors"), "--rank", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.safetensors" in err and "truncated" in err
    assert not (tmp_path / "o.safetensors").exists()


def _ours(capsys) -> list[str]:
    """Our stderr lines (lycoris-lora's logger may add "Logging error" noise about an earlier test's stream)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-engine ")]


def test_every_writing_command_refuses_an_existing_output_without_overwrite(tmp_path, capsys):
    """One rule and one message for merge, resize, extract, convert and bake; --overwrite replaces."""
    a = lycoris_file(tmp_path / "a.safetensors", seed=1)
    state = {k: v.detach().clone().contiguous() for k, v in a1111_root(TinySD.build("sd1")).state_dict().items()}
    keymap = build_keymap({k: tuple(v.shape) for k, v in state.items()})
    t = keymap.lookup("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
    save_file(state, str(tmp_path / "base.safetensors"))
    save_file(dict(state, **{t.weight_key: state[t.weight_key] + 0.01}), str(tmp_path / "tuned.safetensors"))
    base, tuned, x = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), str(tmp_path / "x.safetensors")
    commands = [  # (name, arguments, output, the file whose bytes must survive a refusal)
        ("merge", ["merge", a, "--quiet"], str(tmp_path / "m.safetensors"), "m.safetensors"),
        ("resize", ["resize", a, "--rank", "2", "--quiet"], str(tmp_path / "r.safetensors"), "r.safetensors"),
        ("extract", ["extract", base, tuned, "--rank", "2", "--quiet"], x, "x.safetensors"),
        ("convert", ["convert", a, "--to", "peft"], str(tmp_path / "peft"), "peft/adapter_model.safetensors"),
        ("bake", ["bake", base, "--lora", x, "--quiet"], str(tmp_path / "baked.safetensors"), "baked.safetensors"),
    ]
    for name, argv, out, kept in commands:
        assert main(argv + ["-o", out]) == 0, name
        first = (tmp_path / kept).read_bytes()
        capsys.readouterr()
        assert main(argv + ["-o", out]) == 1, name
        assert _ours(capsys) == [f"lora-engine {name}: {out} exists; pass --overwrite to replace it"]
        assert (tmp_path / kept).read_bytes() == first, name  # untouched
        assert main(argv + ["-o", out, "--overwrite"]) == 0, name
        assert "wrote" in capsys.readouterr().out


def test_outputs_get_ordinary_modes(tmp_path):
    """Files and folders the tools write have the modes open()/mkdir() give (umask applied), not 0600/0700."""
    a = lycoris_file(tmp_path / "a.safetensors", seed=1)
    old = os.umask(0o027)
    try:
        assert main(["merge", a, "-o", str(tmp_path / "m.safetensors"), "--quiet"]) == 0
        assert main(["convert", a, "-o", str(tmp_path / "p"), "--to", "peft"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "p").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "p" / "adapter_model.safetensors").st_mode) == 0o640


def test_a_weight_that_is_not_a_number_is_named(tmp_path, capsys):
    a = lycoris_file(tmp_path / "a.safetensors", seed=1)
    assert main(["merge", f"{a}:abc", "-o", str(tmp_path / "m.safetensors")]) == 1
    assert _ours(capsys) == [f"lora-engine merge: {a}:abc: weight 'abc' is not a number (FILE:WEIGHT, e.g. {a}:0.8)"]
    assert main(["bake", a, "--lora", f"{a}:0.5:x1", "-o", str(tmp_path / "b.safetensors")]) == 1
    assert "weight 'x1' is not a number" in capsys.readouterr().err
    assert split_weights(f"{tmp_path / 'nope'}:abc", 1) == (f"{tmp_path / 'nope'}:abc", [])  # no file: a path
    assert not (tmp_path / "m.safetensors").exists()


def _kohya(path, version: str, value: float = 0.3,
           names=("lora_unet_mid_block_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1")) -> None:
    """A kohya LoRA on ``names`` (8×8 weights) tagged by its trainer as made for ``version``."""
    sd = {}
    for name in names:
        sd |= {f"{name}.lora_down.weight": torch.full((2, 8), value), f"{name}.lora_up.weight": torch.full((8, 2), value),
               f"{name}.alpha": torch.tensor(2.0)}
    save_file(sd, str(path), {"ss_base_model_version": version})


def test_merge_of_different_families_needs_force(tmp_path, capsys):
    _kohya(tmp_path / "one.safetensors", "sd_v1")
    _kohya(tmp_path / "xl.safetensors", "sdxl_base_v1-0")
    args = ["merge", str(tmp_path / "one.safetensors"), str(tmp_path / "xl.safetensors"), "-o", str(tmp_path / "m.safetensors"),
            "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "one.safetensors is SD1.x (metadata)" in err and "xl.safetensors is SDXL" in err
    assert not (tmp_path / "m.safetensors").exists()
    assert main(args + ["--force"]) == 0
    assert "different model families" in capsys.readouterr().out and (tmp_path / "m.safetensors").exists()


def test_merge_warns_about_absurd_weights_and_drops_non_finite_modules(tmp_path, capsys):
    _kohya(tmp_path / "a.safetensors", "sd_v1")
    _kohya(tmp_path / "b.safetensors", "sd_v1", names=["lora_unet_mid_block_attentions_0_proj_out"])
    assert main(["merge", f"{tmp_path / 'a.safetensors'}:1e30", str(tmp_path / "b.safetensors"),
                 "-o", str(tmp_path / "m.safetensors"), "--precision", "fp16", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "weight 1e+30 is outside ±100" in out and out.count("not finite; module left out") == 2, out
    assert list(load_lora(tmp_path / "m.safetensors").modules) == ["lora_unet_mid_block_attentions_0_proj_out"]


def test_bake_force_flag(tmp_path, capsys):
    state = {k: v.detach().clone().contiguous() for k, v in a1111_root(TinySD.build("sd1")).state_dict().items()}
    save_file(state, str(tmp_path / "sd1.safetensors"))
    xl_map = build_keymap({k: tuple(v.shape) for k, v in a1111_root(TinySD.build("sdxl")).state_dict().items()})
    sd, seen = {}, set()
    for name in xl_map.names():
        t = xl_map.lookup(name)
        if len(t.shape) == 2 and t not in seen:
            seen.add(t)
            sd |= {f"{name}.lora_down.weight": torch.randn(2, t.shape[1]), f"{name}.lora_up.weight": torch.randn(t.shape[0], 2)}
    save_file(sd, str(tmp_path / "xl.safetensors"))
    args = ["bake", str(tmp_path / "sd1.safetensors"), "--lora", str(tmp_path / "xl.safetensors"), "-o",
            str(tmp_path / "o.safetensors"), "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SDXL LoRA on an SD1.x model" in err and "nothing of it was applied" in err
    assert main(args + ["--force"]) == 0
    out = capsys.readouterr().out
    assert "warning: xl: " in out and "SDXL LoRA on an SD1.x model" in out
    changed = int(out.split("wrote ")[1].split(": ")[1].split(" tensors changed")[0])
    assert changed > 0
