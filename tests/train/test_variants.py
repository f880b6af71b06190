"""SDXL-shaped host (two text encoders, pooled + time ids; sgm names in the file), v-prediction,
bf16 autocast and gradient checkpointing."""
from __future__ import annotations

import torch

from lora_engine.engine import LoraEngine, Mode, shapes_of
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from lora_engine.train import Trainer, build_config
from lora_engine.train.diffusers_host import diffusers_host
from tests.train.models import make_dataset, tiny_parts, tiny_scheduler, tiny_tokenizer, tiny_vae

BASE = dict(resolution=32, bucket_step=8, batch_size=2, rank=2, alpha=2, save_precision="fp32", save_state=False)


def _sdxl_host(tmp):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.fixtures.models.tiny_sd import text_encoder_config, tiny_unet

    vocab = dict(vocab_size=80, max_position_embeddings=24)
    torch.manual_seed(1)
    te1 = CLIPTextModel(CLIPTextConfig(**(text_encoder_config("sdxl", 1) | vocab))).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**(text_encoder_config("sdxl", 2) | vocab))).eval()
    tok = tiny_tokenizer(tmp + "/tok")
    unet, vae = tiny_unet("sdxl"), tiny_vae()
    for m in (unet, vae, te1, te2):
        m.requires_grad_(False)
    return diffusers_host(unet, [te1, te2], [tok, tok], vae, tiny_scheduler().alphas_cumprod)


def _outputs(host):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        cond = host.encode_text(["red square", "blue background"])
        return host.denoise(x, torch.tensor([10, 600]), cond, [(32, 32), (32, 32)]), cond.pooled


def test_sdxl_training_uses_sgm_names_and_engine_reproduces_it(tmp_path):
    host = _sdxl_host(str(tmp_path))
    data = make_dataset(str(tmp_path / "data"), 2)
    out = str(tmp_path / "xl.safetensors")
    cfg = build_config(BASE | dict(data_dir=data, output=out, steps=3, unet_lr=1e-2, te_lr=1e-2,
                                   train_text_encoder=True))
    trainer = Trainer(host, cfg)
    trainer.run()
    names = [lo.lora_name for lo in trainer.network.loras]
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert not any("down_blocks" in n for n in names)
    assert any(n.startswith("lora_te1_") or n.startswith("lora_te_") for n in names)
    assert any(n.startswith("lora_te2_") for n in names)
    assert load_lora(out).metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    trainer.network.eval()
    trainer.network.attach()
    want, want_pooled = _outputs(host)
    trainer.network.detach()
    engine = LoraEngine(host.root, build_keymap(shapes_of(host.root)), mode=Mode.ONTHEFLY)
    engine.set_stack([StackEntry(load_lora(out))])
    got, got_pooled = _outputs(host)
    engine.restore()
    torch.testing.assert_close(got_pooled, want_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _grads(trainer, checkpointing: bool):
    trainer.host.gradient_checkpointing(checkpointing)
    loss = trainer._loss(0)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.network.parameters()]
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.host.gradient_checkpointing(False)
    return float(loss.detach()), grads


def test_v_prediction_bf16_and_checkpointing(tmp_path):
    parts = tiny_parts(str(tmp_path))
    data = make_dataset(str(tmp_path / "data"), 2)
    cfg = build_config(BASE | dict(data_dir=data, output=str(tmp_path / "v.safetensors"), steps=2, unet_lr=1e-3,
                                   seed=2, train_text_encoder=True))
    trainer = Trainer(parts.host("v_prediction"), cfg)
    with trainer._prepared():
        trainer.batches.cache_all()
        torch.nn.init.normal_(trainer.network.loras[0].up)  # non-zero up: gradients reach every down
        plain, gc = _grads(trainer, False), _grads(trainer, True)
    assert plain[0] == gc[0]  # checkpointing recomputes the same forward
    for a, b in zip(plain[1], gc[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
    assert not parts.unet.is_gradient_checkpointing
    fp32 = trainer.run().losses
    bf16 = Trainer(parts.host("v_prediction"), cfg.replace(mixed_precision="bf16")).run().losses
    assert all(abs(a - b) < 0.05 * abs(a) for a, b in zip(bf16, fp32)) and bf16 != fp32


def test_a1111_layout_root_gets_kohya_diffusers_names(tmp_path):
    """Trained through an A1111 ldm-layout root (sharing the layers), the file uses the same kohya names."""
    import dataclasses

    from tests.fixtures.models.hosts import a1111_root
    from tests.fixtures.models.tiny_sd import TinySD

    parts = tiny_parts(str(tmp_path))
    data = make_dataset(str(tmp_path / "data"), 2)
    host = parts.host()
    ldm_host = dataclasses.replace(host, root=a1111_root(TinySD("sd1", parts.unet, [parts.text_encoder])))
    names = {}
    for label, h in (("diffusers", host), ("a1111", ldm_host)):
        cfg = build_config(BASE | dict(data_dir=data, output=str(tmp_path / f"{label}.safetensors"), steps=1,
                                       train_text_encoder=True, conv_rank=2))
        tr = Trainer(h, cfg)
        tr.run()
        names[label] = {lo.lora_name for lo in tr.network.loras}
    assert names["a1111"] == names["diffusers"]
    assert any(n.startswith("lora_unet_down_blocks_0_resnets_0_conv1") for n in names["a1111"])
    engine = LoraEngine(host.root, build_keymap(shapes_of(host.root)), mode=Mode.ONTHEFLY)
    engine.set_stack([StackEntry(load_lora(str(tmp_path / "a1111.safetensors")))])
    assert not engine.warnings()
    engine.restore()
