"""Training on a single-file ldm/sgm checkpoint: tiny SD1/SD2/SDXL diffusers models written in the
A1111/ComfyUI layout, loaded back by ``load_single_file`` (configs inferred from shapes, diffusers'
converters), must compute what the originals compute; full-size layouts infer the real configs."""
from __future__ import annotations

import gzip
import os

import pytest
import torch

from lora_engine.apps.cli import main
from lora_engine.errors import LoraEngineError, TrainingError
from lora_engine.formats import load_lora
from lora_engine.train import ldm_config as lc
from lora_engine.train.clip_tokenizer import bpe_tokenizer, clip_tokenizers
from lora_engine.train.diffusers_host import diffusers_host
from lora_engine.train.single_file import is_sd_checkpoint, load_single_file, load_single_file_parts
from tests.fixtures.models.full_sd import CLIP_L, OPENCLIP_G, OPENCLIP_H, UNET
from tests.fixtures.models.ldm_checkpoint import ldm_state_dict, write_ldm_checkpoint
from tests.fixtures.models.tiny_sd import _distinct
from tests.train.models import make_dataset, tiny_scheduler, tiny_tokenizer

pytest.importorskip("diffusers")

VOCAB = 78  # tiny_tokenizer: 2 specials + 38 characters, plain and with </w>
_TOK = dict(vocab_size=VOCAB, max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1)
CLIP_TINY = dict(_TOK, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                 hidden_act="quick_gelu", projection_dim=64)
OPENCLIP_TINY = dict(_TOK, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                     hidden_act="gelu", projection_dim=64)
OPENCLIP_G_TINY = dict(_TOK, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                       hidden_act="gelu", projection_dim=96)
_LEVELS = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32)
_SD = dict(_LEVELS, block_out_channels=(32, 64, 64), cross_attention_dim=64,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TINY_UNET = {
    "sd1": dict(_SD, attention_head_dim=2),  # 2 heads: not SD1's 8, so the sidecar yaml says num_heads: 2
    "sd2": dict(_SD, attention_head_dim=(2, 4, 4), use_linear_projection=True),  # yaml: num_head_channels: 16
    "sdxl": dict(_LEVELS, block_out_channels=(32, 64, 128), cross_attention_dim=64 + 128,  # 64-wide heads: no yaml
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=96 + 6 * 4),
}
TINY_TE = {"sd1": (CLIP_TINY,), "sd2": (OPENCLIP_TINY,), "sdxl": (CLIP_TINY, OPENCLIP_G_TINY)}
SIDECAR = {
    "sd1": "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    scale_factor: 0.18215\n"
           "    unet_config:\n      params:\n        num_heads: 2\n        context_dim: 64\n",
    "sd2": "model:\n  params:\n    parameterization: \"v\"\n    unet_config:\n      params:\n"
           "        num_head_channels: 16\n        use_linear_in_transformer: true\n",
}


def _models(arch: str, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = _distinct(UNet2DConditionModel(**TINY_UNET[arch]), seed)
    tes = []
    for i, cfg in enumerate(TINY_TE[arch]):
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        tes.append(_distinct(cls(CLIPTextConfig(**cfg)), seed + i + 1))
    vae = _distinct(AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=32, sample_size=32), seed + 5)
    return unet, tes, vae


@pytest.fixture
def tok_dir(tmp_path):
    folder = str(tmp_path / "tok")
    tiny_tokenizer(folder).save_pretrained(folder)
    return folder


def _checkpoint(tmp_path, arch: str, sidecar: bool = True):
    unet, tes, vae = _models(arch)
    path = write_ldm_checkpoint(str(tmp_path / f"{arch}.safetensors"), arch, unet, tes, vae)
    if sidecar and arch in SIDECAR:
        (tmp_path / f"{arch}.yaml").write_text(SIDECAR[arch])
    return path, unet, tes, vae


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_single_file_computes_what_the_diffusers_models_compute(tmp_path, tok_dir, arch):
    path, unet, tes, vae = _checkpoint(tmp_path, arch)
    host = load_single_file(path, tokenizer=tok_dir)
    pred = "v_prediction" if arch == "sd2" else "epsilon"  # SD2's sidecar says parameterization: "v"
    assert host.prediction_type == pred and host.model_name == arch
    assert len(host.text_encoders) == len(tes) and host.latent_factor == 2
    toks = [tiny_tokenizer(tok_dir)] * len(tes)
    ref = diffusers_host(unet, tes, toks, vae, tiny_scheduler().alphas_cumprod, pred)
    _same(host.alphas_cumprod, ref.alphas_cumprod)  # SD's scaled-linear DDPM schedule
    for a, b in zip(host.text_encoders, tes):
        assert a.config.num_hidden_layers == b.config.num_hidden_layers
        assert a.config.hidden_act == b.config.hidden_act and a.config.eos_token_id == 1
    captions = ["red square, blue background", "a green square"]
    cond, want = host.encode_text(captions), ref.encode_text(captions)
    _same(cond.context, want.context)
    if arch == "sdxl":
        _same(cond.pooled, want.pooled)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    sizes = [(16, 16), (24, 16)]
    with torch.no_grad():
        _same(host.denoise(x, t, cond, sizes), ref.denoise(x, t, want, sizes))
        pixels = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        _same(host.encode_image(pixels, torch.Generator().manual_seed(1)) / (0.13025 if arch == "sdxl" else 0.18215),
              ref.encode_image(pixels, torch.Generator().manual_seed(1)) / vae.config.scaling_factor)
    got = {k: v for k, v in host.unet.config.items() if k in TINY_UNET[arch] and k != "sample_size"}
    want_cfg = {k: v for k, v in unet.config.items() if k in got}
    assert _norm(got) == _norm(want_cfg)


def _norm(cfg: dict) -> dict:
    """Tuples and lists alike; a per-level value that is the same everywhere equals the scalar."""
    out = {}
    n = len(cfg.get("block_out_channels", ()))
    for k, v in cfg.items():
        v = list(v) if isinstance(v, (list, tuple)) else v
        if k in ("transformer_layers_per_block", "attention_head_dim") and not isinstance(v, list):
            v = [v] * n
        out[k] = v
    return out


def test_vae_decodes_like_the_original(tmp_path, tok_dir):
    path, _, _, vae = _checkpoint(tmp_path, "sd1")
    m = load_single_file_parts(path, tokenizer=tok_dir)
    assert m.family == "sd1" and m.vae.config.scaling_factor == 0.18215 and m.vae.config.latent_channels == 4
    assert m.scheduler.config.beta_schedule == "scaled_linear" and m.scheduler.config.num_train_timesteps == 1000
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _same(m.vae.decode(z).sample, vae.decode(z).sample)
        x = torch.rand(1, 3, 16, 16) * 2 - 1
        _same(m.vae.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)


def test_sample_previews_render_from_a_single_file(tmp_path, tok_dir):
    path, *_ = _checkpoint(tmp_path, "sd1")
    host = load_single_file(path, tokenizer=tok_dir)
    images = host.sample(["red square"], 1)
    assert len(images) == 1 and images[0].size == (128, 128)  # sample_size 64 latents x 2 (two VAE levels)


def test_prediction_type_argument_beats_the_sidecar_and_fp16_files_load(tmp_path, tok_dir):
    unet, tes, vae = _models("sd2")
    path = write_ldm_checkpoint(str(tmp_path / "half.safetensors"), "sd2", unet, tes, vae, dtype=torch.float16)
    (tmp_path / "half.yaml").write_text(SIDECAR["sd2"])
    host = load_single_file(path, tokenizer=tok_dir, prediction_type="epsilon")
    assert host.prediction_type == "epsilon" and host.unet.dtype == torch.float32
    assert host.base_model_version == "sd_v2"
    os.remove(tmp_path / "half.yaml")  # no yaml: SD2's 64-wide heads convention -> 1 head (32, 64 wide levels)
    host = load_single_file(path, tokenizer=tok_dir)
    assert host.prediction_type == "epsilon" and list(host.unet.config.attention_head_dim) == [1, 1, 1]


def test_old_clip_layout_without_text_model_level_loads(tmp_path, tok_dir):
    """Early SD1 files name CLIP ``cond_stage_model.transformer.embeddings.*`` (no ``text_model.`` level)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, *_ = _checkpoint(tmp_path, "sd1")
    with safe_open(path, "pt") as fh:
        old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."):
               fh.get_tensor(k) for k in fh.keys()}
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in old
    save_file(old, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.yaml").write_text(SIDECAR["sd1"])
    a, b = load_single_file(path, tokenizer=tok_dir), load_single_file(str(tmp_path / "old.safetensors"),
                                                                        tokenizer=tok_dir)
    _same(a.encode_text(["blue square"]).context, b.encode_text(["blue square"]).context)


# ---- (b) config inference on full-size layouts (meta device: shapes only) ------------------------

def _full_checkpoint(arch: str) -> tuple[dict, object]:
    """The ldm/sgm state dict (meta tensors) of a full-size model, with the extras real files carry."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te_cfgs = {"sd1": (CLIP_L,), "sd2": (OPENCLIP_H | {"num_hidden_layers": 24},), "sdxl": (CLIP_L, OPENCLIP_G)}[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET[arch])
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        tes = [(CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(**c))
               for i, c in enumerate(te_cfgs)]
        sd = ldm_state_dict(arch, unet, tes, vae)
        clip = "conditioner.embedders.0.transformer." if arch == "sdxl" else "cond_stage_model.transformer."
        if arch != "sd2":  # an int64 arange in A1111-era files; the model keeps its own
            sd[clip + "text_model.embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.int64)
        if arch == "sd2":  # the 24th block and the projection are in the file; diffusers drops both
            sd["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024)
        if arch != "sd1":
            sd[lc.TE_PREFIXES[arch][-1] + "logit_scale"] = torch.empty(())
    return sd, unet


def _full_shapes(arch: str):
    sd, unet = _full_checkpoint(arch)
    return {k: tuple(v.shape) for k, v in sd.items()}, unet


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_full_size_layouts_infer_the_real_configs(arch):
    from diffusers import UNet2DConditionModel

    shapes, real = _full_shapes(arch)
    assert lc.detect_family(shapes) == arch
    pred = "v_prediction" if arch == "sd2" else "epsilon"  # SD2.1-768 is a v model: 96-latent samples
    cfg = lc.unet_config(shapes, arch, {}, pred)
    te_cfgs = [lc.clip_config(shapes, p) if p.endswith("transformer.") else lc.openclip_config(shapes, p)
               for p in lc.TE_PREFIXES[arch]]
    cfg = lc.add_time_dim(cfg, te_cfgs[-1]["projection_dim"])
    fields = ["in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "cross_attention_dim", "use_linear_projection", "attention_head_dim",
              "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim", "sample_size", "norm_num_groups"]
    want = {k: real.config[k] for k in fields}
    got = {k: cfg.get(k) for k in fields}  # absent: diffusers' default None (no SDXL added embedding)
    assert _norm(got) == _norm(want)
    with torch.device("meta"):  # the inferred model has exactly the real parameter shapes
        rebuilt = UNet2DConditionModel(**cfg)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in real.state_dict().items()}
    expect_te = {"sd1": [CLIP_L], "sd2": [OPENCLIP_H], "sdxl": [CLIP_L, OPENCLIP_G]}[arch]
    for got_te, real_te in zip(te_cfgs, expect_te):  # SD2: 24 OpenCLIP blocks -> diffusers' 23 layers
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "hidden_act"):
            assert got_te[k] == real_te[k], (arch, k)
    if arch == "sdxl":
        assert te_cfgs[1]["projection_dim"] == 1280
    vae = lc.vae_config(shapes, arch)
    assert vae["block_out_channels"] == (128, 256, 512, 512) and vae["layers_per_block"] == 2
    assert vae["latent_channels"] == 4 and vae["scaling_factor"] == (0.13025 if arch == "sdxl" else 0.18215)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_full_size_checkpoints_convert_and_load_strictly(arch, tok_dir):
    """The whole load path on real-size layouts (meta tensors): inferred configs, diffusers' converters, the
    strict load; SD2's 24 OpenCLIP blocks become 23 layers, SDXL's second encoder keeps its projection."""
    from lora_engine.train.single_file import build_models, infer_configs

    sd, real = _full_checkpoint(arch)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    pred = "v_prediction" if arch == "sd2" else "epsilon"
    unet_cfg, vae_cfg, te_cfgs = infer_configs("full.safetensors", shapes, arch, {}, pred)
    toks = [tiny_tokenizer(tok_dir)] * len(te_cfgs)
    unet, vae, tes = build_models("full.safetensors", arch, unet_cfg, vae_cfg, te_cfgs, toks,
                                  lambda prefixes: {k: v for k, v in sd.items() if k.startswith(prefixes)},
                                  torch.float32)
    assert unet.device.type == "meta" and unet.dtype == torch.float32
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in real.parameters())
    layers = {"sd1": [12], "sd2": [23], "sdxl": [12, 32]}[arch]
    assert [te.config.num_hidden_layers for te in tes] == layers
    if arch == "sdxl":
        assert tes[1].text_projection.weight.shape == (1280, 1280)
    assert vae.config.block_out_channels == (128, 256, 512, 512)


def test_sidecar_heads_override_the_convention(tmp_path):
    shapes, _ = _full_shapes("sd1")
    assert lc.unet_config(shapes, "sd1", {})["attention_head_dim"] == 8
    assert lc.unet_config(shapes, "sd1", {"num_heads": -1, "num_head_channels": 64})["attention_head_dim"] == \
        (5, 10, 20, 20)
    ck = tmp_path / "m.safetensors"
    (tmp_path / "m.yaml").write_text(SIDECAR["sd2"])
    original, where = lc.read_sidecar(str(ck))
    assert where == str(tmp_path / "m.yaml") and lc.sidecar_prediction_type(original) == "v_prediction"
    assert lc.sidecar_unet_params(original)["num_head_channels"] == 16
    (tmp_path / "m.yaml").write_text("model: [unclosed\n")
    with pytest.raises(TrainingError, match=r"m\.yaml: cannot read the checkpoint's config yaml"):
        lc.read_sidecar(str(ck))


# ---- tokenizers ----------------------------------------------------------------------------------

def test_bpe_table_builds_a_clip_tokenizer(tmp_path):
    bpe = tmp_path / "bpe.txt.gz"
    merges = ["r e", "re d</w>", "s q", "sq u", "squ a", "squa r", "squar e</w>"]
    with gzip.open(bpe, "wt", encoding="utf-8") as fh:
        fh.write("bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = bpe_tokenizer(str(bpe), pad_token="!")
    assert len(tok) == 512 + len(merges) + 2 and tok.model_max_length == 77
    ids = tok("red square").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "red</w>", "square</w>", "<|endoftext|>"]
    assert tok.pad_token_id == tok.convert_tokens_to_ids("!") and tok.eos_token_id == 512 + len(merges) + 1


def test_tokenizer_folder_and_diffusers_layout(tmp_path, tok_dir):
    assert len(clip_tokenizers(["clip", "openclip"], tok_dir)) == 2
    root = tmp_path / "pipe"
    tiny_tokenizer(str(root / "tokenizer"))
    tiny_tokenizer(str(root / "tokenizer_2")).save_pretrained(str(root / "tokenizer_2"))
    tiny_tokenizer(str(root / "tokenizer")).save_pretrained(str(root / "tokenizer"))
    a, b = clip_tokenizers(["clip", "openclip"], root)
    assert a.name_or_path.endswith("tokenizer") and b.name_or_path.endswith("tokenizer_2")
    with pytest.raises(TrainingError, match="missing: tokenizer folder does not exist"):
        clip_tokenizers(["clip"], tmp_path / "missing")


# ---- (c) the CLI end to end ----------------------------------------------------------------------

def test_train_command_on_a_single_file_checkpoint(tmp_path, tok_dir, capsys):
    path, *_ = _checkpoint(tmp_path, "sd1")
    data = make_dataset(str(tmp_path / "data"), 2)
    out = str(tmp_path / "lora.safetensors")
    rc = main(["train", "--base", path, "--tokenizer", tok_dir, "--data", data, "--output", out, "--steps", "2",
               "--resolution", "32", "--rank", "2", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    assert "done at step 2/2" in capsys.readouterr().out
    lf = load_lora(out)
    assert lf.metadata["ss_base_model_version"] == "sd_v1" and lf.metadata["ss_steps"] == "2"
    assert lf.modules and all(m.adapter.rank == 2 for m in lf.modules.values())
    toml = tmp_path / "t.toml"
    toml.write_text(f'base = "{path}"\ntokenizer = "{tok_dir}"\nprediction_type = "v_prediction"\n'
                    "resolution = 32\nsteps = 1\n")
    rc = main(["train", str(toml), "--data", data, "--output", str(tmp_path / "v.safetensors")])
    assert rc == 0 and "done at step 1/1" in capsys.readouterr().out
    meta = load_lora(str(tmp_path / "v.safetensors")).metadata  # the TOML's prediction_type reached the host
    assert meta["ss_prediction_type"] == "v_prediction" and meta["modelspec.prediction_type"] == "v"
    assert lf.metadata["ss_prediction_type"] == "epsilon"


def test_train_page_routes_sd_checkpoints_to_the_single_file_loader(tmp_path, tok_dir):
    import time

    from lora_engine.apps.ui.context import UiConfig, UiContext
    from lora_engine.apps.ui.train_session import TrainForm, TrainSession

    path, *_ = _checkpoint(tmp_path, "sd1")
    (tmp_path / "loras").mkdir()
    session = TrainSession(UiContext(UiConfig((str(tmp_path / "loras"),), confine=False)))  # paths as given
    data = make_dataset(str(tmp_path / "data"), 2)
    msg = session.start(TrainForm(path, data, "page", steps=2, rank=2, batch_size=2, resolution=32, tokenizer=tok_dir))
    assert msg == "started", msg
    t0 = time.time()
    while not session.status()[2] and time.time() - t0 < 120:
        time.sleep(0.2)
    text = session.status()[0]
    assert "state: done" in text and "step 2/2" in text, text
    lf = load_lora(str(tmp_path / "loras" / "page.safetensors"))
    assert lf.metadata["ss_base_model_version"] == "sd_v1" and lf.modules
    bad = session.start(TrainForm(path, data, "x", tokenizer=str(tmp_path / "nope")))
    assert bad.startswith("error: ") and "nope: tokenizer folder does not exist" in bad


# ---- (d) bad input: one line naming the file -----------------------------------------------------

def _one_line_error(capsys, args) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    return err[0]


def test_bad_checkpoints_fail_with_one_line_naming_the_file(tmp_path, tok_dir, capsys):
    from safetensors.torch import save_file

    path, *_ = _checkpoint(tmp_path, "sd1")
    data = make_dataset(str(tmp_path / "data"), 1)
    run = ["--tokenizer", tok_dir, "--data", data, "--output", str(tmp_path / "o.safetensors"), "--steps", "1"]

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(path, "rb").read()[:-1000])
    line = _one_line_error(capsys, ["train", "--base", str(cut)] + run)
    assert str(cut) in line and "truncated" in line

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}, str(lora))
    line = _one_line_error(capsys, ["train", "--base", str(lora)] + run)
    assert str(lora) in line and "not a Stable Diffusion checkpoint" in line and "LoRA" in line

    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        no_vae = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith("first_stage_model.")}
    bare = tmp_path / "novae.safetensors"
    save_file(no_vae, str(bare))
    line = _one_line_error(capsys, ["train", "--base", str(bare)] + run)
    assert str(bare) in line and "no VAE weights" in line

    line = _one_line_error(capsys, ["train", "--base", str(tmp_path / "absent.safetensors")] + run)
    assert "absent.safetensors: cannot open" in line

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")
    line = _one_line_error(capsys, ["train", "--base", str(ckpt)] + run)
    assert str(ckpt) in line and "only .safetensors" in line

    with safe_open(path, "pt") as fh:  # a UNet missing a layer: the strict load names the file and a key
        short = {k: fh.get_tensor(k) for k in fh.keys() if "output_blocks.2.1.conv" not in k}
    bad = tmp_path / "short.safetensors"
    save_file(short, str(bad))
    line = _one_line_error(capsys, ["train", "--base", str(bad)] + run)
    assert str(bad) in line and "UNet weights do not fit" in line and "missing" in line


def test_refiner_and_inpainting_checkpoints_are_refused_by_name(tmp_path, tok_dir):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, *_ = _checkpoint(tmp_path, "sdxl")
    with safe_open(path, "pt") as fh:
        refiner = {k.replace("embedders.1.", "embedders.0."): fh.get_tensor(k) for k in fh.keys()
                   if not k.startswith("conditioner.embedders.0.")}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(TrainingError, match=r"refiner\.safetensors: an SDXL refiner checkpoint"):
        load_single_file(str(tmp_path / "refiner.safetensors"), tokenizer=tok_dir)
    _, tes, vae = _models("sd1")
    torch.manual_seed(0)
    inpaint = UNet2DConditionModel(**(TINY_UNET["sd1"] | {"in_channels": 9}))
    bad = write_ldm_checkpoint(str(tmp_path / "inpaint.safetensors"), "sd1", inpaint, tes, vae)
    with pytest.raises(TrainingError, match=r"inpaint\.safetensors: the UNet takes 9 input channels"):
        load_single_file(bad, tokenizer=tok_dir)


def test_without_a_tokenizer_the_error_says_what_to_provide(tmp_path):
    import importlib.util

    from lora_engine.train.clip_tokenizer import _from_cache

    if importlib.util.find_spec("open_clip") is not None or _from_cache("clip") is not None:
        pytest.skip("a CLIP tokenizer is available offline here (open_clip or the HF cache)")
    path, *_ = _checkpoint(tmp_path, "sd1")
    with pytest.raises(TrainingError) as e:
        load_single_file(path)
    msg = str(e.value)
    assert path in msg and "--tokenizer" in msg and "open_clip" in msg and "\n" not in msg


def test_demo_bases_and_sd_checkpoints_are_told_apart(tmp_path):
    from lora_engine.apps.demo.base import base_path

    demo, exists = base_path()
    if exists:
        assert not is_sd_checkpoint(demo)
    path, *_ = _checkpoint(tmp_path, "sd1")
    assert is_sd_checkpoint(path) and not is_sd_checkpoint(str(tmp_path / "nothing.safetensors"))
    with pytest.raises(LoraEngineError):
        load_single_file(str(tmp_path))
