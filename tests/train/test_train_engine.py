"""Training on tiny real diffusers/transformers parts: the loss goes down, the base stays bit-identical,
and the saved kohya file, loaded and applied by the engine (merged and on the fly), reproduces the
trained model's outputs."""
from __future__ import annotations

import os

import pytest
import torch

from lora_engine.engine import LoraEngine, Mode, shapes_of
from lora_engine.formats import load_lora
from lora_engine.library.hashes import hash_file
from lora_engine.keymap import build_keymap
from lora_engine.patch import StackEntry
from lora_engine.train import Trainer, build_config
from lora_engine.train.schedule import diffusion_loss, loss_weights, noisy_inputs
from tests.train.models import make_dataset, tiny_parts


def _snapshot(root):
    return {k: v.detach().clone() for k, v in root.state_dict().items()}


def _assert_identical(root, snap):
    now = root.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


def _outputs(host, captions):
    """UNet prediction and text-encoder output on fixed inputs (no grad)."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([50, 700])
    with torch.no_grad():
        cond = host.encode_text(captions)
        return host.denoise(x, t, cond, [(32, 32)] * 2), cond.context


def _eval_loss(host, trainer):
    """Loss on fixed noise/timesteps over every image, the same before and after (independent of the loop)."""
    g = torch.Generator().manual_seed(7)
    total = 0.0
    with torch.no_grad():
        for idx, item in enumerate(trainer.dataset.items):
            lat = trainer.batches.latent(idx, False)
            noise = torch.randn(lat.shape, generator=g)
            t = torch.randint(0, 1000, (1,), generator=g)
            noisy, target = noisy_inputs(lat, noise, t, host.alphas_cumprod, host.prediction_type)
            pred = host.denoise(noisy, t, host.encode_text([item.caption]), [item.bucket])
            total += float(diffusion_loss(pred, target, loss_weights(t, host.alphas_cumprod, 0, "epsilon")))
    return total / len(trainer.dataset.items)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    parts = tiny_parts(str(tmp_path))
    host = parts.host()
    data = make_dataset(str(tmp_path / "data"), 4)
    out = str(tmp_path / "out" / "tiny.safetensors")
    cfg = build_config(dict(data_dir=data, output=out, resolution=32, bucket_step=8, batch_size=2, steps=24,
                            unet_lr=1e-2, te_lr=1e-3, rank=4, alpha=2, conv_rank=2, conv_alpha=1,
                            train_text_encoder=True, save_precision="fp32", seed=3, min_snr_gamma=5.0,
                            scheduler="cosine", warmup_steps=2))
    snap = _snapshot(host.root)
    hooks = _hook_count(host.root)
    progress = []
    trainer = Trainer(host, cfg, progress=progress.append)
    before = _eval_loss(host, trainer)
    result = trainer.run()
    return dict(parts=parts, host=host, trainer=trainer, result=result, snap=snap, before=before, out=out,
                progress=progress, hooks=hooks)


def _hook_count(root):
    """LoRA hooks left on the host (transformers adds its own output-recording hooks on first use)."""
    from lora_engine.train.network import LoraHook

    return sum(isinstance(getattr(h, "__self__", None), LoraHook) for m in root.modules()
               for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()))


def test_loss_decreases_and_base_is_bit_identical(trained):
    host, trainer = trained["host"], trained["trainer"]
    _assert_identical(host.root, trained["snap"])
    assert all(not p.requires_grad for p in host.root.parameters())
    assert _hook_count(host.root) == trained["hooks"]
    trainer.network.attach()
    try:
        after = _eval_loss(host, trainer)
    finally:
        trainer.network.detach()
    assert after < 0.9 * trained["before"], (trained["before"], after)
    steps = [p.step for p in trained["progress"]]
    assert steps == list(range(1, 25))
    assert trained["progress"][-1].eta_s == 0 and trained["progress"][-1].it_per_s > 0


def test_saved_file_reproduces_trained_outputs_in_engine(trained):
    host, trainer, out = trained["host"], trained["trainer"], trained["out"]
    captions = ["red square, blue background", "green square"]
    base_unet, base_te = _outputs(host, captions)
    trainer.network.eval()
    trainer.network.attach()
    try:
        want_unet, want_te = _outputs(host, captions)
    finally:
        trainer.network.detach()
    assert not torch.allclose(want_unet, base_unet, atol=1e-4)  # the LoRA does something, on both parts
    assert not torch.allclose(want_te, base_te, atol=1e-4)
    lf = load_lora(out)
    assert lf.format == "kohya" or lf.format.startswith("kohya"), lf.format
    assert len(lf.modules) == len(trainer.network.loras) and not lf.unknown_keys
    assert any(n.startswith("lora_te_") for n in lf.modules) and any("resnets" in n for n in lf.modules)
    root = host.root
    for mode in (Mode.ONTHEFLY, Mode.MERGED):
        engine = LoraEngine(root, build_keymap(shapes_of(root)), mode=mode)
        plan = engine.set_stack([StackEntry(lf)])
        assert not engine.warnings(), engine.warnings()
        assert sum(r.touched for r in plan.reports.values()) == len(lf.modules)
        got_unet, got_te = _outputs(host, captions)
        engine.restore()
        torch.testing.assert_close(got_te, want_te, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_unet, want_unet, rtol=1e-4, atol=1e-5)
    _assert_identical(root, trained["snap"])


def test_metadata_and_hashes(trained):
    out = trained["out"]
    meta = load_lora(out).metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "24" and meta["ss_output_name"] == "tiny"
    assert meta["ss_unet_lr"] == "0.01" and meta["ss_text_encoder_lr"] == "0.001"
    assert '"red square": 1' in meta["ss_tag_frequency"] and meta["ss_num_train_images"] == "4"
    h = hash_file(out)
    assert meta["sshs_model_hash"] == h.addnet and meta["sshs_legacy_hash"] == h.legacy
    assert os.path.isfile(trained["result"].state_path)
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]


def test_engine_stack_is_taken_off_and_put_back(tmp_path):
    parts = tiny_parts(str(tmp_path))
    host = parts.host()
    data = make_dataset(str(tmp_path / "data"), 2)
    first = str(tmp_path / "first.safetensors")
    cfg = build_config(dict(data_dir=data, output=first, resolution=32, bucket_step=8, steps=2, unet_lr=1e-2,
                            rank=2, alpha=2, save_precision="fp32", save_state=False))
    Trainer(host, cfg).run()
    snap = _snapshot(host.root)
    engine = LoraEngine(host.root, build_keymap(shapes_of(host.root)), mode=Mode.MERGED)
    engine.set_stack([StackEntry(load_lora(first))])
    patched = _snapshot(host.root)
    seen = []

    def check(progress):  # during training the user's LoRA is off
        seen.append(all(torch.equal(v, snap[k]) for k, v in host.root.state_dict().items()))

    Trainer(host, cfg.replace(output=str(tmp_path / "second.safetensors")), progress=check, engine=engine).run()
    assert seen and all(seen)
    _assert_identical(host.root, patched)
    engine.restore()
    _assert_identical(host.root, snap)
