"""convert on Flux.1 and SD3 LoRAs: kohya (native names) ⇄ diffusers/PEFT ⇄ ComfyUI-native. A converted
file must give the same effective weights as its source, through the engine (on the diffusers tree and on
the native tree, fused ``qkv``/``linear1`` and the swapped final adaLN included) and through diffusers' own
loader where it reads the dialect (``FluxPipeline``/``StableDiffusion3Pipeline.lora_state_dict`` ->
``load_lora_adapter``, merged by peft). Sources are written by real writers (peft + diffusers
``save_lora_weights``) or from random factors in the kohya/ComfyUI layout (tests/fixtures/files/flux.py)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lora_engine.engine import shapes_of
from lora_engine.errors import ToolError
from lora_engine.formats import load_lora
from lora_engine.tools.convert import convert
from tests.families.test_flux_apply import _merged, diffusers_oracle
from tests.fixtures.files.flux import flux_modules, native_lora, peft_file, write
from tests.fixtures.models.flux import TINY_SD3, NativeTree, flux_model, native_state, sd3_model

pytest.importorskip("diffusers")
pytest.importorskip("peft")



def _same(root, a, b, atol=1e-6):
    wa, ra = _merged(root, a)
    wb, rb = _merged(root, b)
    assert ra.unmatched == [] and rb.unmatched == [] and ra.touched and rb.touched, (ra.line(), rb.line())
    assert set(wa) == set(wb)
    changed = 0
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), f"{k}: max err {(wa[k] - wb[k]).abs().max()}"
        changed += not torch.equal(wa[k], root.state_dict()[k])
    assert changed, "the LoRA changed nothing"
    return wa


def _meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def test_kohya_to_diffusers_to_kohya(flux, tmp_path):
    d, n = flux
    nshapes = shapes_of(n)
    src = write(native_lora(nshapes, 3, flux_modules(nshapes), r=4, alpha=2.0), tmp_path / "k.safetensors")
    res = convert(src, tmp_path / "d.safetensors", "diffusers")
    lf = load_lora(tmp_path / "d.safetensors")
    assert lf.format == "diffusers" and not lf.unknown_keys and res.modules == len(lf.modules)
    # the fused qkv (3 layers) and linear1 (4 layers) are split; their down matrix is shared
    assert len(lf.modules) == len(flux_modules(nshapes)) + 2 + 2 + 3
    q = lf.modules["lora_unet_single_transformer_blocks_0_attn_to_q"].adapter
    mlp = lf.modules["lora_unet_single_transformer_blocks_0_proj_mlp"].adapter
    assert torch.equal(q.down, mlp.down) and q.rank == mlp.rank == 4
    want = _same(d, src, tmp_path / "d.safetensors")
    _same(n, src, tmp_path / "d.safetensors")
    oracle = diffusers_oracle(d, tmp_path / "d.safetensors")
    assert all(torch.allclose(oracle[k], want[k], atol=1e-6, rtol=0) for k in want)

    back = convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", "kohya")
    lf2 = load_lora(tmp_path / "k2.safetensors")
    assert lf2.format == "kohya" and set(lf2.modules) == set(load_lora(src).modules)
    assert lf2.modules["lora_unet_double_blocks_0_img_attn_qkv"].adapter.rank == 12  # 3 pieces, rank 4 each
    assert any("rank 12" in w for w in back.warnings)
    _same(n, src, tmp_path / "k2.safetensors")
    _same(d, src, tmp_path / "k2.safetensors")


def test_peft_file_to_kohya_and_comfyui(flux, tmp_path):
    d, n = flux
    peft_file(d, tmp_path, seed=1)  # ai-toolkit/diffusers scripts: to_q, to_k, to_v, proj_mlp, norm_out, ...
    src = tmp_path / "pytorch_lora_weights.safetensors"
    for to, fmt in (("kohya", "kohya"), ("comfyui", "comfyui")):
        out = tmp_path / f"{to}.safetensors"
        convert(src, out, to)
        lf = load_lora(out)
        assert lf.format == fmt and not lf.unknown_keys
        _same(n, src, out)
        _same(d, src, out)
    with safe_open(str(tmp_path / "comfyui.safetensors"), "pt") as f:
        assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in f.keys()


def test_split_qkv_file_splits_the_down_matrix(flux, tmp_path):
    """kohya ``split_qkv``: up block-diagonal (3h × 3r), down stacked (3r × h): each piece keeps its r."""
    d, n = flux
    h = shapes_of(n)["img_in.weight"][0]
    g = torch.Generator().manual_seed(2)
    r = 2
    up = torch.zeros(3 * h, 3 * r)
    for i in range(3):
        up[i * h:(i + 1) * h, i * r:(i + 1) * r] = torch.randn(h, r, generator=g)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    src = write({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": torch.randn(3 * r, h, generator=g),
                 f"{name}.alpha": torch.tensor(3.0)}, tmp_path / "s.safetensors")
    convert(src, tmp_path / "d.safetensors", "diffusers")
    lf = load_lora(tmp_path / "d.safetensors")
    assert {m.adapter.rank for m in lf.modules.values()} == {r} and len(lf.modules) == 3
    assert all(m.adapter.scale == pytest.approx(3.0 / (3 * r)) for m in lf.modules.values())
    _same(d, src, tmp_path / "d.safetensors")


def test_pieces_of_different_scales_are_not_fused(flux, tmp_path):
    g = torch.Generator().manual_seed(4)
    t = {}
    for proj, alpha in (("to_q", 1.0), ("to_k", 2.0)):
        key = f"lora_unet_transformer_blocks_0_attn_{proj}"
        t |= {f"{key}.lora_down.weight": torch.randn(2, 32, generator=g), f"{key}.lora_up.weight": torch.randn(32, 2, generator=g),
              f"{key}.alpha": torch.tensor(alpha)}
    t |= {"lora_unet_single_transformer_blocks_0_proj_mlp.lora_down.weight": torch.randn(2, 32, generator=g),
          "lora_unet_single_transformer_blocks_0_proj_mlp.lora_up.weight": torch.randn(128, 2, generator=g)}
    src = write(t, tmp_path / "mixed.safetensors")
    with pytest.raises(ToolError, match="img_attn.qkv: its pieces have different scales"):
        convert(src, tmp_path / "k.safetensors", "kohya")
    assert not (tmp_path / "k.safetensors").exists()
    convert(src, tmp_path / "d.safetensors", "diffusers")  # the split dialect holds them as they are
    _same(flux[0], src, tmp_path / "d.safetensors")


def test_text_encoders_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(5)
    t = {}
    for key in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", "lora_unet_double_blocks_0_img_attn_proj"):
        t |= {f"{key}.lora_down.weight": torch.randn(2, 32, generator=g),
              f"{key}.lora_up.weight": torch.randn(32, 2, generator=g), f"{key}.alpha": torch.tensor(1.0)}
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "k.safetensors"), {"ss_training_comment": "cat", "ss_output_name": "k"})
    convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers")
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
            "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0.lora_A.weight",
            "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"} <= keys
    assert _meta(tmp_path / "d.safetensors")["ss_training_comment"] == "cat"
    convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", "kohya")
    a, b = load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "k2.safetensors")
    assert set(a.modules) == set(b.modules)
    for name, m in a.modules.items():  # a rename: the same tensors, the same α
        assert torch.equal(m.adapter.up, b.modules[name].adapter.up) and m.adapter.scale == b.modules[name].adapter.scale
    meta = _meta(tmp_path / "k2.safetensors")
    assert meta["ss_training_comment"] == "cat" and meta["ss_output_name"] == "k2"


@pytest.fixture(scope="module")
def sd3():
    d = sd3_model(TINY_SD3, seed=4)
    return d, NativeTree(native_state(d, "sd3"))


def test_sd3_kohya_to_diffusers_with_reference(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    d, n = sd3
    nshapes = shapes_of(n)
    mods = [k[:-7] for k, s in nshapes.items() if k.startswith("joint_blocks.") and k.endswith(".weight") and len(s) == 2]
    src = write(native_lora(nshapes, 3, mods + ["final_layer.adaLN_modulation.1"], alpha=3.0), tmp_path / "k.safetensors")
    with pytest.raises(ToolError, match="--reference"):  # the tiny model's depth is not width / 64
        convert(src, tmp_path / "d.safetensors", "diffusers")
    convert(src, tmp_path / "d.safetensors", "diffusers", reference=shapes_of(d))
    want = _same(d, src, tmp_path / "d.safetensors")
    _same(n, src, tmp_path / "d.safetensors")
    oracle = diffusers_oracle(d, tmp_path / "d.safetensors", StableDiffusion3Pipeline)
    assert all(torch.allclose(oracle[k], want[k], atol=1e-6, rtol=0) for k in want)
    convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", "kohya", reference=nshapes)
    _same(n, src, tmp_path / "k2.safetensors")


def test_cli(flux, tmp_path, capsys):
    from lora_engine.apps.cli import main

    d, n = flux
    peft_file(d, tmp_path, seed=1)
    src, out = str(tmp_path / "pytorch_lora_weights.safetensors"), str(tmp_path / "c.safetensors")
    assert main(["convert", src, "-o", out, "--to", "comfyui"]) == 0
    printed = capsys.readouterr()
    assert "as comfyui" in printed.out and "rank" in printed.out
    assert main(["convert", src, "-o", out, "--to", "comfyui"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err


def test_full_width_outputs_read_by_diffusers_kohya_converter(tmp_path):
    """At Flux.1-dev's width (diffusers' kohya converter hard-codes linear1's 3072/12288 split): a diffusers
    file's split pieces stacked into kohya and ComfyUI-native files are read back by diffusers as the same
    ΔW (compared through ΔW·P on the meta-device tree, as tests/families/test_flux_converters does)."""
    from tests.families.test_flux_converters import _ours, _theirs
    from tests.fixtures.models.flux import FLUX_DEV

    dshapes = {k: tuple(v.shape) for k, v in flux_model(FLUX_DEV, meta=True).state_dict().items()}
    g = torch.Generator().manual_seed(8)
    t = {}
    for path in ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                 "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
                 "transformer_blocks.3.attn.to_q", "transformer_blocks.3.attn.add_v_proj", "norm_out.linear"]:
        o, i = dshapes[path + ".weight"]
        t[f"transformer.{path}.lora_A.weight"] = torch.randn(4, i, generator=g) * 0.1
        t[f"transformer.{path}.lora_B.weight"] = torch.randn(o, 4, generator=g) * 0.1
    src = write(t, tmp_path / "d.safetensors")
    want = _ours(src, dshapes)
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"{to}.safetensors"
        convert(src, out, to)
        theirs = _theirs(out)
        assert set(want) <= set(theirs), to
        for k in set(theirs) - set(want):  # k, v of a fused qkv only q reached: zero rows, zero ΔW
            assert not theirs[k].any(), (to, k)
        for k in want:
            assert torch.allclose(theirs[k], want[k], atol=1e-9), (to, k)
