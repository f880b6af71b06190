"""kohya sd-scripts Flux files trained with ``split_qkv=True``: written here the way ``networks/lora_flux.py``
``LoRANetwork.state_dict`` saves them (per-part rank-r downs concatenated, ups placed block-diagonally, α
unchanged, ``ss_network_args`` in the metadata). Applied as the hosts apply them (scale α/(n·r)): diffusers'
kohya converter (its block-diagonal ``is_sparse`` path) is the oracle for the double blocks, an independent
fp64 sum for ``linear1``; one warning line per file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from tests.families.test_flux_apply import _close, _loaded, _merged, diffusers_oracle
from tests.fixtures.files.flux import native_lora, write
from tests.fixtures.models.flux import NativeTree, flux_model, native_state

pytest.importorskip("diffusers")
pytest.importorskip("peft")

R, ALPHA = 2, 4.0


@pytest.fixture(scope="module")
def models():
    d = flux_model(seed=7)
    return d, NativeTree(native_state(d))


def kohya_split_file(nshapes: dict, path, seed: int, modules: list[str], metadata: bool = True):
    """``lora_unet_<module>`` as kohya saves a split_qkv network: parts [h, h, h] (qkv) or [h, h, h, mlp]
    (linear1), h = the layer's input width; other modules (e.g. ``img_mlp.0``) as plain rank-r LoRAs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        o, i = nshapes[module + ".weight"]
        key = "lora_unet_" + module.replace(".", "_")
        if module.endswith(("qkv", "linear1")):
            parts = [i] * 3 if module.endswith("qkv") else [i] * 3 + [o - 3 * i]
            downs = [torch.randn(R, i, generator=g) * 0.1 for _ in parts]
            ups = [torch.randn(p, R, generator=g) * 0.1 for p in parts]
            up = torch.zeros(sum(parts), R * len(parts))
            start = 0
            for j, (p, u) in enumerate(zip(parts, ups)):
                up[start:start + p, j * R:(j + 1) * R] = u
                start += p
            out[key + ".lora_down.weight"] = torch.cat(downs, 0)
            out[key + ".lora_up.weight"] = up
        else:
            out[key + ".lora_down.weight"] = torch.randn(R, i, generator=g) * 0.1
            out[key + ".lora_up.weight"] = torch.randn(o, R, generator=g) * 0.1
        out[key + ".alpha"] = torch.tensor(ALPHA)
    meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(R), "ss_network_alpha": str(ALPHA)}
    if metadata:
        meta["ss_network_args"] = json.dumps({"split_qkv": "True", "train_blocks": "all"})
    save_file(out, str(path), metadata=meta)
    return str(path), out


DOUBLE = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_mlp.0"]


def _note_lines(engine) -> list[str]:
    return [w for w in engine.warnings() if "split_qkv" in w]


def test_double_blocks_match_diffusers_and_warn_once(models, tmp_path):
    d, n = models
    path, _ = kohya_split_file(shapes_of(n), tmp_path / "split.safetensors", 1, DOUBLE)
    want = diffusers_oracle(d, path)
    for root in (d, n):
        e = LoraEngine(root, build_keymap(shapes_of(root)), mode="merged")
        e.set_stack([StackEntry(load_lora(path))])
        lines = _note_lines(e)
        assert len(lines) == 1 and len(e.warnings()) == 1, e.warnings()
        assert lines[0].startswith("split: ") and "2 attention qkv module(s) 3×" in lines[0], lines[0]
        assert "linear1" not in lines[0].split("weaker")[0]
        e.restore()
    got_d, _ = _merged(d, path)
    _close(got_d, want, "diffusers tree")
    got_n, _ = _merged(n, path)
    _close(got_n, native_state(_loaded(d, want)), "native tree")


@pytest.mark.parametrize("metadata", [True, False])
def test_linear1_scale_and_detection(models, tmp_path, metadata):
    """linear1 (q, k, v, mlp parts): W₀ + α/(4r)·up·down, as every host computes it (fp64 here); found by
    the tensors alone when the metadata is stripped."""
    d, n = models
    nshapes = shapes_of(n)
    path, t = kohya_split_file(nshapes, tmp_path / "s.safetensors", 2, ["single_blocks.0.linear1"], metadata)
    got, rep = _merged(n, path)
    key = "lora_unet_single_blocks_0_linear1"
    down, up = t[key + ".lora_down.weight"].double(), t[key + ".lora_up.weight"].double()
    w0 = n.state_dict()["single_blocks.0.linear1.weight"].double()
    want = w0 + ALPHA / (4 * R) * (up @ down)
    assert torch.allclose(got["single_blocks.0.linear1.weight"].double(), want, atol=1e-6)
    line = rep.line()
    assert line is not None and "1 single-block linear1 module(s) 4×" in line and "split_qkv" in line


def test_plain_kohya_file_has_no_note(models, tmp_path):
    _, n = models
    nshapes = shapes_of(n)
    path = write(native_lora(nshapes, 3, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"], r=6),
                 tmp_path / "plain.safetensors")
    lf = load_lora(path)
    assert lf.notes == []
    _, rep = _merged(n, path)
    assert rep.line() is None
