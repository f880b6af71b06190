"""`lora-engine generate` on diffusers Flux.1, Chroma and SD3 folders: a tiny random ``FluxPipeline`` /
``ChromaPipeline`` / ``StableDiffusion3Pipeline`` saved to disk, a LoRA on the transformer and the CLIP text
encoder written by the real writers (peft adapts the modules, the pipeline's ``save_lora_weights`` writes the file; Chroma's
T5 gets none: diffusers' loader cannot read one, tests/families/test_text_encoders covers T5 LoRAs). Oracle:
the same pipeline with diffusers' own ``load_lora_weights`` + ``fuse_lora(lora_scale=…)``, same seed."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lora_engine.apps.generate import GenerateOptions, generate, load_pipeline, pipeline_root, run_pipeline  # noqa: E402
from tests.fixtures.models.dit_pipelines import chroma_pipeline, flux_pipeline, sd3_pipeline  # noqa: E402

SIZE = 32
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out", "norm1.linear", "norm.linear"]


def _adapted(module, targets, seed, r=4, alpha=8):
    """peft's LoRA state dict (random A and B) for a copy of ``module`` and its LoraConfig."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    m = copy.deepcopy(module)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(cfg, m)
    return get_peft_model_state_dict(m), cfg.to_dict()


def _write_lora(pipe, folder) -> str:
    tr, tr_cfg = _adapted(pipe.transformer, DIT_TARGETS, seed=11)
    te = {}
    if not type(pipe.text_encoder).__name__.startswith("T5"):  # diffusers' loader cannot read a T5 LoRA (Chroma)
        te, te_cfg = _adapted(pipe.text_encoder, TE_TARGETS, seed=12, alpha=4)
        te = dict(text_encoder_lora_layers=te, text_encoder_lora_adapter_metadata=te_cfg)
    type(pipe).save_lora_weights(str(folder), transformer_lora_layers=tr, transformer_lora_adapter_metadata=tr_cfg, **te)
    path = os.path.join(folder, "style.safetensors")
    os.replace(os.path.join(folder, "pytorch_lora_weights.safetensors"), path)
    return path


BUILD = {"flux": flux_pipeline, "chroma": chroma_pipeline, "sd3": sd3_pipeline}
PIPE = {"flux": "FluxPipeline", "chroma": "ChromaPipeline", "sd3": "StableDiffusion3Pipeline"}
PARTS = {"flux": {"transformer", "text_encoder", "text_encoder_2"}, "chroma": {"transformer", "text_encoder"},
         "sd3": {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}}


@pytest.fixture(scope="module", params=list(BUILD))
def setup(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    pipe = BUILD[request.param](str(tmp))
    loras = tmp / "loras"
    loras.mkdir()
    return request.param, str(tmp / "model"), str(loras), _write_lora(pipe, loras)


def _opts(setup, prompt, **kw):
    _, model, loras, _ = setup
    return GenerateOptions(model, prompt, lora_dirs=(loras,), steps=3, width=SIZE, height=SIZE, seed=5, **kw)


def _px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_pipeline_kind_and_parts(setup):
    kind, model, _, _ = setup
    pipe = load_pipeline(model)
    assert type(pipe).__name__ == PIPE[kind]
    assert {n for n, _ in pipeline_root(pipe).named_children()} == PARTS[kind]


def test_lora_changes_image_and_matches_diffusers_fuse(setup):
    kind, model, _, path = setup
    pipe = load_pipeline(model)
    before = {k: v.clone() for k, v in pipeline_root(pipe).state_dict().items()}
    on = generate(_opts(setup, "red square <lora:style:0.7>"), pipe=pipe)
    off = generate(_opts(setup, "red square"), pipe=pipe)
    assert on.warnings == () and on.prompt == "red square"
    assert np.abs(_px(on.images[0]) - _px(off.images[0])).max() > 8, "the LoRA changed nothing"
    after = pipeline_root(pipe).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights not restored bit for bit"

    theirs = load_pipeline(model)  # diffusers' own loader, merged into the weights by peft
    theirs.load_lora_weights(path)
    components = ["transformer"] + (["text_encoder"] if kind != "chroma" else [])  # Flux's default: transformer only
    theirs.fuse_lora(components=components, lora_scale=0.7)
    cfg = {"flux": 3.5, "chroma": 5.0, "sd3": 7.0}[kind]  # generate's defaults
    want = run_pipeline(theirs, "red square", _opts(setup, "", cfg=cfg))[0]
    assert np.abs(_px(want) - _px(on.images[0])).max() <= 1  # fp32 sums in another order: one level at most
    assert not np.array_equal(_px(want), _px(off.images[0]))


def test_cli_writes_png(setup, tmp_path, capsys):
    from lora_engine.apps.cli import main

    kind, model, loras, _ = setup
    out = tmp_path / "out"
    rc = main(["generate", model, "red <lora:style:1> <lora:nothere:1>", "--lora-dir", loras, "--steps", "2",
               "--width", str(SIZE), "--height", str(SIZE), "--negative", "blurry", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "nothere" in printed
    assert ("does not use it" in printed) == (kind == "flux")
    assert [p for p in os.listdir(out) if p.endswith(".png")]
