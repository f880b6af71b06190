"""`lora-engine generate`: a real tiny diffusers StableDiffusionPipeline saved to disk, a kohya
LoRA written for it, generation with <lora:…> tags compared with applying the LoRA by hand."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from lora_engine.engine import LoraEngine, shapes_of  # noqa: E402
from lora_engine.formats import load_lora  # noqa: E402
from lora_engine.apps.generate import GenerateOptions, generate, load_pipeline, pipeline_root  # noqa: E402
from lora_engine.keymap import build_keymap  # noqa: E402
from lora_engine.patch import StackEntry  # noqa: E402
from tests.fixtures.files.kohya import write_kohya  # noqa: E402
from tests.train.models import tiny_parts  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tmp = tmp_path_factory.mktemp("generate")
    parts = tiny_parts(str(tmp))
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear",
                                                                            beta_start=0.00085, beta_end=0.012,
                                                                            clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp / "model"
    pipe.save_pretrained(str(folder))
    loras = tmp / "loras"
    loras.mkdir()
    write_kohya(loras / "style.safetensors", build_keymap(shapes_of(pipeline_root(pipe))), seed=3, rank=2, alpha=2.0,
                fraction=1.0)
    return folder, loras


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load_pipeline(str(model_dir[0]))


def _opts(model_dir, prompt, **kw):
    return GenerateOptions(str(model_dir[0]), prompt, lora_dirs=(str(model_dir[1]),), steps=3, width=SIZE,
                           height=SIZE, seed=5, cfg=4.0, **kw)


def _px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _weights(pipe) -> dict:
    return {k: v.detach().clone() for k, v in pipeline_root(pipe).state_dict().items()}


def test_lora_changes_image_and_matches_hand_application(model_dir, pipe):
    before = _weights(pipe)
    on = generate(_opts(model_dir, "red square <lora:style:1>"), pipe=pipe)
    off = generate(_opts(model_dir, "red square <lora:style:0>"), pipe=pipe)
    assert on.prompt == off.prompt == "red square"
    assert on.warnings == () and off.warnings == ()
    assert np.abs(_px(on.images[0]) - _px(off.images[0])).max() > 0

    root = pipeline_root(pipe)
    engine = LoraEngine(root, build_keymap(shapes_of(root)))
    engine.set_stack([StackEntry(load_lora(model_dir[1] / "style.safetensors"))])
    try:
        gen = torch.Generator("cpu").manual_seed(5)
        by_hand = pipe("red square", num_inference_steps=3, guidance_scale=4.0, width=SIZE, height=SIZE,
                       generator=[gen]).images[0]
    finally:
        engine.restore()
    assert np.array_equal(_px(by_hand), _px(on.images[0]))

    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_lora_warns_once_and_still_generates(model_dir, pipe):
    res = generate(_opts(model_dir, "blue square <lora:nothere:1>", count=2), pipe=pipe)
    assert len(res.warnings) == 1 and "nothere" in res.warnings[0]
    assert len(res.images) == 2 and res.images[0].size == (SIZE, SIZE)
    plain = generate(_opts(model_dir, "blue square"), pipe=pipe)
    assert np.array_equal(_px(plain.images[0]), _px(res.images[0]))  # image i uses seed + i


def test_block_weights_reach_the_engine(model_dir, pipe):
    full = generate(_opts(model_dir, "red square <lora:style:1>"), pipe=pipe)
    ones, zeros = ",".join(["1"] * 26), ",".join(["0"] * 26)  # 26 ratios: every block, BASE included
    all_blocks = generate(_opts(model_dir, f"red square <lora:style:1:lbw={ones}>"), pipe=pipe)
    no_blocks = generate(_opts(model_dir, f"red square <lora:style:1:lbw={zeros}>"), pipe=pipe)
    assert all_blocks.warnings == () and no_blocks.warnings == ()
    assert np.array_equal(_px(full.images[0]), _px(all_blocks.images[0]))
    assert not np.array_equal(_px(full.images[0]), _px(no_blocks.images[0]))


def test_cancel_mid_run_restores_weights(model_dir, pipe):
    from lora_engine.errors import OperationCancelled

    before = _weights(pipe)
    seen = []

    def stop(step, total):
        seen.append((step, total))
        if step == 2:
            raise OperationCancelled("stop")
    with pytest.raises(OperationCancelled):
        generate(_opts(model_dir, "red square <lora:style:1>"), pipe=pipe, progress=stop)
    assert seen == [(1, 3), (2, 3)]
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_model_folder_is_one_line(tmp_path):
    from lora_engine.errors import ModelFolderError

    with pytest.raises(ModelFolderError, match="no such folder"):
        load_pipeline(str(tmp_path / "missing"))
    with pytest.raises(ModelFolderError, match="not a diffusers model folder"):
        load_pipeline(str(tmp_path))


def test_cli_writes_png(model_dir, tmp_path, capsys):
    from lora_engine.apps.cli import main

    out = tmp_path / "out"
    rc = main(["generate", str(model_dir[0]), "red square <lora:style:0.7> <lora:nothere:1>", "--lora-dir",
               str(model_dir[1]), "--steps", "2", "--width", str(SIZE), "--height", str(SIZE), "--seed", "1",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    pngs = sorted(os.listdir(out))
    assert pngs and all(p.endswith(".png") for p in pngs)
    assert str(out / pngs[0]) in printed.out
    assert "nothere" in printed.out + printed.err


def test_cli_missing_folder_one_line(tmp_path, capsys):
    from lora_engine.apps.cli import main

    rc = main(["generate", str(tmp_path / "nope"), "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "no such folder" in err


def _sdxl_pipeline(tmp):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.fixtures.models.tiny_sd import text_encoder_config, tiny_unet
    from tests.train.models import tiny_tokenizer, tiny_vae

    tok = tiny_tokenizer(str(tmp / "tok"))

    def encoder(index, cls):  # the tiny SDXL encoders, sized for the letters tokenizer
        torch.manual_seed(index)
        return cls(CLIPTextConfig(**text_encoder_config("sdxl", index) | dict(vocab_size=80,
                                                                              max_position_embeddings=24))).eval()
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=encoder(1, CLIPTextModel),
                                     text_encoder_2=encoder(2, CLIPTextModelWithProjection), tokenizer=tok,
                                     tokenizer_2=tok, unet=tiny_unet("sdxl"),
                                     scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear",
                                                                      beta_start=0.00085, beta_end=0.012))


def test_sdxl_folder(tmp_path):
    pipe = _sdxl_pipeline(tmp_path)
    root = pipeline_root(pipe)
    assert {n for n, _ in root.named_children()} == {"unet", "text_encoder", "text_encoder_2"}
    pipe.save_pretrained(str(tmp_path / "xl"))
    (tmp_path / "l").mkdir()
    truth = write_kohya(tmp_path / "l" / "x.safetensors", build_keymap(shapes_of(root)), seed=1, fraction=1.0)
    assert any(n.startswith("lora_te2_") for n in truth)
    loaded = load_pipeline(str(tmp_path / "xl"))
    before = _weights(loaded)
    opts = GenerateOptions(str(tmp_path / "xl"), "red <lora:x:1>", lora_dirs=(str(tmp_path / "l"),), steps=2,
                           width=SIZE, height=SIZE)
    on = generate(opts, pipe=loaded)
    off = generate(GenerateOptions(**{**opts.__dict__, "prompt": "red <lora:x:0>"}), pipe=loaded)
    assert on.warnings == () and on.images[0].size == (SIZE, SIZE)
    assert not np.array_equal(_px(on.images[0]), _px(off.images[0]))
    after = _weights(loaded)
    assert all(torch.equal(before[k], after[k]) for k in before)
