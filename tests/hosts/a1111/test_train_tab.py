"""The "LoRA Training" tab without A1111: its TrainHost over an ldm-named model, trained through the shared
Train page's session (TrainingJob) with a queue-lock stand-in held for the whole run.

The stand-in ``LatentDiffusion`` has the names of ``tests.models.hosts.a1111_root(tiny, wrapped=True)``
(checked below): ``model.diffusion_model`` is the ldm view whose leaves ARE a diffusers UNet's modules;
since the view itself has no forward, its stand-in ``forward(x, timesteps, context)`` runs that diffusers
UNet (``tests.hosts.a1111.standin.LdmUNet``); ``cond_stage_model`` is the hijack wrapper stand-in
(``.wrapped.transformer`` = HF CLIP, ``forward(texts)``); ``first_stage_model.encode`` returns a diffusers
``AutoencoderKL``'s diagonal Gaussian (``.mean``/``.std``, like ldm's); ``alphas_cumprod`` is ldm's
scaled-linear β schedule (0.00085 → 0.012, 1000 steps); ``scale_factor`` 0.18215.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from extension.train_host import a1111_train_host, prediction_type
from extension.train_tab import FORM_FIELDS, TrainTab, default_preset, preset_form_values
from lora_engine.engine import shapes_of
from lora_engine.errors import TrainingError
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.train.network import NetworkConfig, TrainNetwork
from lora_engine.train.presets import PRESETS
from lora_engine.ui.context import UiConfig, UiContext
from lora_engine.ui.train_session import FINISHED, TrainForm, TrainSession
from tests.hosts.a1111.standin import HijackedCLIP, LdmUNet
from tests.models.hosts import a1111_root, diffusers_root
from tests.train.models import make_dataset, tiny_scheduler


def tiny_vae_x8():
    """A 4-level AutoencoderKL: 8 pixels per latent cell, as SD's."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64).eval()


class FirstStage(nn.Module):
    """ldm ``AutoencoderKL.encode(x)`` -> a diagonal Gaussian (diffusers' has the same ``mean``/``std``)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, x):
        return self.vae.encode(x).latent_dist


class LatentDiffusion(nn.Module):
    def __init__(self, tiny, vae, parameterization: str = "eps"):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = LdmUNet(tiny.unet)
        self.cond_stage_model = HijackedCLIP(tiny.text_encoders[0])
        self.first_stage_model = FirstStage(vae)
        self.register_buffer("alphas_cumprod", tiny_scheduler().alphas_cumprod.clone())
        self.scale_factor = 0.18215
        self.parameterization = parameterization
        self.is_sd1, self.is_sdxl = True, False
        self.requires_grad_(False)


class QueueLock:
    """``modules.call_queue.queue_lock``: a lock used as a context manager; records who held it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.acquired = 0

    def __enter__(self):
        self._lock.acquire()
        self.acquired += 1
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@pytest.fixture
def model(tiny):
    return LatentDiffusion(tiny, tiny_vae_x8())


def test_standin_has_a1111_names(model, tiny):
    ours = {k for k in model.state_dict() if not k.startswith(("first_stage_model.", "alphas_cumprod"))}
    assert ours == set(a1111_root(tiny, wrapped=True).state_dict())


def test_host_calls_the_model_like_a1111(model, tiny):
    host = a1111_train_host(model)
    assert host.root is model and host.prediction_type == "epsilon" and host.base_model_version == "sd_v1"
    assert host.latent_factor == 8 and torch.equal(host.alphas_cumprod, model.alphas_cumprod)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    cond = host.encode_text(["red square", "blue"])
    assert torch.equal(cond.context, model.cond_stage_model(["red square", "blue"])) and cond.pooled is None
    with torch.no_grad():
        want = tiny.unet(x, t, encoder_hidden_states=cond.context).sample
        assert torch.equal(host.denoise(x, t, cond, [(64, 64)] * 2), want)
        px = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        z = host.encode_image(px, torch.Generator().manual_seed(5))
        dist = model.first_stage_model.vae.encode(px).latent_dist
        assert torch.allclose(z, dist.sample(torch.Generator().manual_seed(5)) * 0.18215, atol=1e-6)


def test_parameterization(model):
    model.parameterization = "v"
    assert a1111_train_host(model).prediction_type == "v_prediction"
    model.parameterization = "x0"
    with pytest.raises(TrainingError, match="parameterization 'x0'"):
        prediction_type(model)


def _form(tmp_path, **kw) -> TrainForm:
    data = make_dataset(str(tmp_path / "data"), 2, size=(64, 64))
    values = dict(base="ignored", data_dir=data, output="tab_lora", steps=3, rank=2, alpha=1.0, unet_lr=1e-3,
                  te_lr=1e-3, train_text_encoder=True, batch_size=2, resolution=64, seed=1)
    return TrainForm(**(values | kw))


def _run(session: TrainSession, form: TrainForm, timeout: float = 60):
    assert session.start(form) == "started"
    t0 = time.monotonic()
    while session.job.status().state not in FINISHED and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    return session.job.status()


def test_trains_the_loaded_model_under_the_queue_lock(tmp_path, model, tiny):
    lock = QueueLock()
    seen = []
    model.model.diffusion_model.register_forward_pre_hook(lambda m, a: seen.append(lock.locked()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tab = TrainTab(get_model=lambda: model, lock=lock, preset="sd15_character")
    session = TrainSession(UiContext(UiConfig(lora_dirs=(str(tmp_path / "out"),), hash_files=False)), tab.setup)
    generation = {}

    def generate():  # a generation queued behind the run: A1111 takes the same lock
        while not lock.locked():
            time.sleep(0.005)
        with lock:
            generation["state_when_run"] = session.job.status().state

    gen = threading.Thread(target=generate)
    gen.start()
    st = _run(session, _form(tmp_path))
    gen.join(30)
    assert st.state == "done", st.error
    assert st.step == 3 and len(st.losses) == 3 and all(l == l for l in st.losses)  # finite, no NaN
    assert seen and all(seen) and generation["state_when_run"] in FINISHED and lock.acquired == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base weights bit-identical
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.model.diffusion_model.input_blocks[1][1]._forward_hooks  # LoRA hooks taken off

    lora = load_lora(st.output)
    names = set(lora.modules)
    assert lora.metadata["ss_base_model_version"] == "sd_v1"
    # kohya's spelling, the same names a diffusers-held copy of the same model trains
    cfg = NetworkConfig(rank=2, alpha=1.0, train_text_encoder=True)
    droot = diffusers_root(tiny)
    want = {lo.lora_name for lo in TrainNetwork(droot, build_keymap(shapes_of(droot)), cfg).loras}
    assert names == want and any(n.startswith("lora_unet_down_blocks_") for n in names)
    assert any(n.startswith("lora_te_text_model_") for n in names)
    # ... which the engine maps onto the A1111 model's own modules (the very same layer objects)
    a_map, d_map = build_keymap(shapes_of(model)), build_keymap(shapes_of(droot))
    a_mods, d_mods = dict(model.named_modules()), dict(droot.named_modules())
    for n in names:
        a, d = a_map.lookup(n), d_map.lookup(n)
        assert a is not None and a.weight_key.startswith(("model.diffusion_model.", "cond_stage_model.wrapped."))
        assert a_mods[a.weight_key.rpartition(".")[0]] is d_mods[d.weight_key.rpartition(".")[0]]


def test_preset_goes_under_the_form(tmp_path, model):
    tab = TrainTab(get_model=lambda: model, preset="sd15_style")
    session = TrainSession(UiContext(UiConfig(lora_dirs=(str(tmp_path),), hash_files=False)), tab.setup)
    setup = tab.setup(_form(tmp_path))
    assert setup.settings["conv_rank"] == 8 and setup.settings["flip"] is True and setup.lock is None
    from lora_engine.ui.train_session import build_job

    job = build_job(session.ctx, _form(tmp_path, rank=3), tab.setup)
    assert job.cfg.network.conv_rank == 8 and job.cfg.network.rank == 3  # the form wins where it speaks


def test_preset_values_fill_form_fields(model):
    for name in PRESETS:
        values = preset_form_values(name)
        assert values and set(values) <= set(FORM_FIELDS)
        assert all(PRESETS[name][k] == v for k, v in values.items())
    assert preset_form_values("auto") == {}
    assert default_preset(model) == "sd15_character"
    model.is_sdxl = True
    assert default_preset(model) == "sdxl_character"


def test_refusals_are_one_line_statuses(tmp_path, model):
    ctx = UiContext(UiConfig(lora_dirs=(str(tmp_path),), hash_files=False))
    model.lowvram = True
    message = TrainSession(ctx, TrainTab(get_model=lambda: model).setup).start(_form(tmp_path))
    assert message.startswith("error: training needs the whole model on the GPU") and "\n" not in message
    message = TrainSession(ctx, TrainTab(get_model=lambda: None).setup).start(_form(tmp_path))
    assert message == "error: no checkpoint is loaded"
