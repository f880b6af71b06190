"""The demo's parts: data generator, tokenizer, model file, base training script."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

from lora_engine.apps.demo import dataset, model, tokenizer  # noqa: E402
from lora_engine.errors import LoraFileError  # noqa: E402


def test_dataset_is_deterministic_and_balanced():
    a, ca = dataset.make_dataset(24, seed=3)
    b, cb = dataset.make_dataset(24, seed=3)
    c, _ = dataset.make_dataset(24, seed=4)
    assert torch.equal(a, b) and ca == cb
    assert not torch.equal(a, c)
    assert a.shape == (24, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert sorted(set(ca)) == sorted(f"a {col} {sh}" for col in dataset.BASE_COLOURS for sh in dataset.SHAPES)
    assert not any(dataset.CONCEPT_COLOUR in cap for cap in ca)


@pytest.mark.parametrize("shape", dataset.SHAPES)
def test_render_draws_the_named_colour_on_the_background(shape):
    spec = dataset.ShapeSpec("blue", shape, 0.5, 0.5, 0.3)
    img = dataset.render(spec, 32)
    centre = img[18, 16]  # inside every shape (the triangle's centroid is below the centre)
    assert np.allclose(centre, np.round(np.array(dataset.COLOURS["blue"]) * 255) / 255, atol=1e-6)
    assert np.allclose(img[0, 0], np.round(np.array(dataset.BACKGROUND) * 255) / 255, atol=1e-6)


def test_tokenizer_layout():
    tok = tokenizer.DemoTokenizer()
    ids = tok.encode("A Red, circle!")
    v = tokenizer.VOCAB
    assert ids == [tok.bos_id, v.index("a"), v.index("red"), v.index("circle"), tok.eos_id] + [tok.pad_id] * 3
    assert tok.encode("a teal circle")[2] == tok.unk_id and tok.unknown("a teal circle") == ["teal"]
    long = tok.encode(" ".join(["red"] * 20))
    assert len(long) == tok.max_length and long[-1] == tok.eos_id
    assert tok(["", "a"]).shape == (2, tok.max_length)
    assert tok.encode("") == [tok.bos_id, tok.eos_id] + [tok.pad_id] * 6


def test_model_file_round_trip_and_bad_files(tmp_path):
    m = model.build_model(seed=1)
    path = tmp_path / "m.safetensors"
    model.save_model(m, path, {"steps": 0})
    back = model.load_model(path)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.float16).float()), k
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoraFileError, match="not a demo base model"):
        model.load_model(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(LoraFileError, match="junk.safetensors"):
        model.load_model(tmp_path / "junk.safetensors")


def test_key_map_sees_the_demo_model_as_sd1():
    from lora_engine.engine import shapes_of
    from lora_engine.keymap import build_keymap

    km = build_keymap(shapes_of(model.build_model()))
    assert km.architecture == "sd1" and km.unet_naming == "diffusers"
    t = km.lookup("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
    assert t is not None and t.weight_key == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    t = km.lookup("lora_te_text_model_encoder_layers_1_self_attn_v_proj")
    assert t is not None and t.weight_key.startswith("text_encoder.") and t.component == "te"


def test_base_training_script_is_deterministic(tmp_path):
    from lora_engine.apps.demo import train_base

    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        args = train_base._parser().parse_args(["--out", str(out), "--steps", "3", "--batch", "2", "--pool", "6",
                                                "--warmup", "2"])
        losses = []
        train_base.train(args, lambda step, loss: losses.append(loss))
        outs.append((model.load_model(out).state_dict(), losses))
    (sa, la), (sb, lb) = outs
    assert la == lb and len(la) == 3
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    init = model.build_model(0).state_dict()
    assert any(not torch.equal(sa[k], init[k].half().float()) for k in sa)  # it trained
