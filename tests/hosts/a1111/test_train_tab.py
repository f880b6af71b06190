"""The "LoRA Training" tab without A1111: its TrainHost over ldm/sgm-named models (stand-ins in
``train_standin``, whose forwards run the diffusers UNet sharing the views' leaves), trained through the
shared Train page's session (TrainingJob) with a queue-lock stand-in held for the whole run."""
from __future__ import annotations

import math
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.optional import needs, require

require("PIL")  # the trainer (lora_engine.train, tests.train.models) reads images with pillow
from extension.train_host import a1111_train_host, prediction_type
from extension.train_tab import FORM_FIELDS, TrainTab, default_preset, preset_form_values
from lora_engine.engine import LoraEngine, shapes_of
from lora_engine.errors import TrainingError
from lora_engine.formats import load_lora
from lora_engine.keymap import build_keymap
from lora_engine.patch.plan import StackEntry
from lora_engine.train.network import NetworkConfig, TrainNetwork
from lora_engine.train.presets import PRESETS
from lora_engine.apps.ui.context import UiConfig, UiContext
from lora_engine.apps.ui.train_session import FINISHED, TrainForm, TrainSession
from tests.hosts.a1111.conftest import MODULES_A, module_of, write_lora
from tests.hosts.a1111.train_standin import DiffusionEngine, LatentDiffusion, QueueLock, State, tiny_vae_x8
from tests.fixtures.models.hosts import a1111_root, diffusers_root
from tests.fixtures.models.tiny_sd import TinySD
from tests.train.models import make_dataset


@pytest.fixture
def model(tiny):
    return LatentDiffusion(tiny, tiny_vae_x8())


def test_standin_has_a1111_names(model, tiny, tiny_xl):
    for m, t in ((model, tiny), (DiffusionEngine(tiny_xl, tiny_vae_x8()), tiny_xl)):
        ours = {k for k in m.state_dict() if not k.startswith(("first_stage_model.", "alphas_cumprod"))}
        assert ours == set(a1111_root(t, wrapped=True).state_dict())


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
    session = TrainSession(UiContext(UiConfig(lora_dirs=(str(tmp_path / "out"),), hash_files=False,
                                                       confine=False)), tab.setup)  # as the tab's context
    generation = {}

    def generate():  # a generation queued behind the run: A1111 takes the same lock
        deadline = time.monotonic() + 30
        while not lock.locked() and time.monotonic() < deadline:
            time.sleep(0.005)
        with lock:
            generation["state_when_run"] = session.job.status().state

    gen = threading.Thread(target=generate, daemon=True)
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
    # ... and merging the file into the A1111 model gives what the trained hooks computed
    host, network = a1111_train_host(model), session.job.trainer.network
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)), torch.tensor([300])
    with torch.no_grad():
        network.attach()
        want = host.denoise(x, t, host.encode_text(["red square"]), [(64, 64)])
        network.detach()
        engine = LoraEngine(model, a_map, "merged")
        engine.set_stack([StackEntry(lora)])
        got = host.denoise(x, t, host.encode_text(["red square"]), [(64, 64)])
        engine.restore()
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, tiny.unet(
        x, t, encoder_hidden_states=host.encode_text(["red square"]).context).sample, atol=1e-5)


def test_interrupt_button_stops_the_run_after_the_step_with_the_lora_saved(tmp_path, model):
    """A1111's Interrupt (``shared.state.interrupt()``) while training: the job ends ``cancelled`` after the
    step it was pressed in, queue lock released, file loadable. Skip does not stop it; an Interrupt left
    from an earlier generation is cleared when the run takes the queue (``state.begin``)."""
    lock, state = QueueLock(), State()
    state.interrupt()  # stale: pressed during an earlier generation, never cleared since
    tab = TrainTab(get_model=lambda: model, lock=lock, state=state)
    session = TrainSession(UiContext(UiConfig(lora_dirs=(str(tmp_path / "out"),), hash_files=False,
                                                       confine=False)), tab.setup)  # as the tab's context
    seen = []

    def press(module, args):  # UNet forwards of step n + 1 see status().step == n
        step = session.job.status().step
        seen.append((lock.locked(), state.job))
        if step == 1:
            state.skip()
        elif step == 2:
            state.interrupt()

    model.model.diffusion_model.register_forward_pre_hook(press)
    st = _run(session, _form(tmp_path, steps=20))
    assert st.state == "cancelled", st.error
    assert st.step == 3 and len(st.losses) == 3 and all(math.isfinite(v) for v in st.losses)
    assert "stop requested by the host at step 3" in st.log and "cancelled at step 3" in st.log
    assert seen and all(s == (True, "lora-engine training") for s in seen)  # under the lock, as state's job
    assert not lock.locked() and lock.acquired == 1 and state.job == ""  # state.end(), lock released
    lora = load_lora(st.output)
    assert lora.modules and lora.metadata["ss_steps"] == "3" and lora.metadata["ss_max_train_steps"] == "20"
    ups = [t for k, t in load_file(st.output).items() if k.endswith("lora_up.weight")]
    assert ups and any(torch.count_nonzero(t) for t in ups)  # trained: up starts at zero
    # a new run takes the queue again and clears the flag this one left set
    assert state.interrupted
    st = _run(session, _form(tmp_path, steps=1, output="tab_lora_2"))
    assert st.state == "done" and not state.interrupted and lock.acquired == 2


def test_preset_goes_under_the_form(tmp_path, model):
    tab = TrainTab(get_model=lambda: model, preset="sd15_style")
    session = TrainSession(UiContext(UiConfig(lora_dirs=(str(tmp_path),), hash_files=False,
                                                       confine=False)), tab.setup)  # as the tab's context
    setup = tab.setup(_form(tmp_path))
    assert setup.settings["conv_rank"] == 8 and setup.settings["flip"] is True and setup.lock is None
    from lora_engine.apps.ui.train_session import build_job

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
    ctx = UiContext(UiConfig(lora_dirs=(str(tmp_path),), hash_files=False, confine=False))
    model.lowvram = True
    message = TrainSession(ctx, TrainTab(get_model=lambda: model).setup).start(_form(tmp_path))
    assert message.startswith("error: training needs the whole model on the GPU") and "\n" not in message
    message = TrainSession(ctx, TrainTab(get_model=lambda: None).setup).start(_form(tmp_path))
    assert message == "error: no checkpoint is loaded"


@pytest.fixture(scope="module")
def tiny_xl():
    return TinySD.build("sdxl")


def test_sdxl_host_matches_diffusers_conditioning(tiny_xl):
    model = DiffusionEngine(tiny_xl, tiny_vae_x8())
    host = a1111_train_host(model)
    assert host.base_model_version == "sdxl_base_v1-0" and host.prediction_type == "epsilon"
    te1, te2 = tiny_xl.text_encoders
    cond = host.encode_text(["red square", "blue"])
    h1 = model.conditioner.embedders[0](["red square", "blue"])
    h2, pooled = model.conditioner.embedders[1](["red square", "blue"])
    assert torch.equal(cond.context, torch.cat([h1, h2], -1)) and torch.equal(cond.pooled, pooled)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5, 700])
    sizes = [(64, 48), (48, 64)]  # (w, h) buckets; sgm and diffusers both take (h, w)
    ids = torch.tensor([[h, w, 0, 0, h, w] for (w, h) in sizes], dtype=torch.float32)
    with torch.no_grad():
        want = tiny_xl.unet(x, t, encoder_hidden_states=cond.context,
                            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids}).sample
        got = host.denoise(x, t, cond, sizes)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(host.denoise(x, t, cond, sizes[::-1]), want, atol=1e-3)  # sizes matter


def test_sdxl_trains_with_the_sdxl_preset(tmp_path, tiny_xl):
    model = DiffusionEngine(tiny_xl, tiny_vae_x8())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lock = QueueLock()
    tab = TrainTab(get_model=lambda: model, lock=lock)  # auto preset: sdxl_character
    session = TrainSession(UiContext(UiConfig(lora_dirs=(str(tmp_path / "out"),), hash_files=False,
                                                       confine=False)), tab.setup)  # as the tab's context
    st = _run(session, _form(tmp_path, train_text_encoder=False, steps=2))
    assert st.state == "done", st.error
    assert session.job.cfg.min_snr_gamma == PRESETS["sdxl_character"]["min_snr_gamma"] and lock.acquired == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lora = load_lora(st.output)
    assert lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    names = set(lora.modules)
    assert names and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                       "lora_unet_output_blocks_")) for n in names)  # kohya's sgm spelling
    a_map = build_keymap(shapes_of(model))
    assert all(a_map.lookup(n).weight_key.startswith("model.diffusion_model.") for n in names)


def test_the_runtime_engine_loras_are_off_while_training_and_back_after(tmp_path, model, tiny):
    base = {k: v.clone() for k, v in model.state_dict().items()}
    write_lora(tmp_path / "a.safetensors", tiny, MODULES_A, 1)
    engine = LoraEngine(model, build_keymap(shapes_of(model)), "merged")
    engine.set_stack([StackEntry(load_lora(str(tmp_path / "a.safetensors")))])
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    probe = module_of(tiny, MODULES_A["lora_unet_input_blocks_4_0_in_layers_2"])
    key = next(k for k, v in model.state_dict(keep_vars=True).items() if v is probe.weight)
    assert not torch.equal(base[key], merged[key])
    seen = []
    unet = model.model.diffusion_model
    unet.register_forward_pre_hook(lambda m, a: seen.append(torch.equal(probe.weight, base[key])))
    tab = TrainTab(get_model=lambda: model, get_engine=lambda m: engine if m is model else None)
    session = TrainSession(UiContext(UiConfig(lora_dirs=(str(tmp_path / "out"),), hash_files=False,
                                                       confine=False)), tab.setup)  # as the tab's context
    st = _run(session, _form(tmp_path, steps=2))
    assert st.state == "done", st.error
    assert seen and all(seen)  # trained on the bare checkpoint
    assert len(engine.stack) == 1 and all(torch.equal(merged[k], v) for k, v in model.state_dict().items())


@needs("gradio")
def test_on_ui_tabs_builds_the_tab_over_the_shared_page(tmp_path, monkeypatch):
    """``on_ui_tabs`` with stand-ins of the A1111 modules it reads (``shared``, ``paths``, ``call_queue``)."""
    import types
    from types import SimpleNamespace

    from extension import callbacks, train_tab
    from tests.hosts.a1111.standin import Opts

    pkg = types.ModuleType("modules")
    pkg.shared = SimpleNamespace(sd_model=None, opts=Opts({}), cmd_opts=SimpleNamespace(lora_dir=str(tmp_path)),
                                 state=State())
    pkg.paths = SimpleNamespace(models_path=str(tmp_path))
    pkg.call_queue = SimpleNamespace(queue_lock=threading.Lock())
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setattr(callbacks, "_CONTROLLER", None)
    [(blocks, title, elem_id)] = train_tab.on_ui_tabs()
    assert (title, elem_id) == ("LoRA Training", "lora_training")
    base = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "le-train-base")
    assert base.visible is False and base.value == ""  # it trains the loaded checkpoint: no 'demo' to mislead
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    by_name = {getattr(f.fn, "__name__", ""): f.fn for f in fns}
    updates = by_name["choose"]("sd15_style")
    assert len(updates) == 12 and all(isinstance(u, dict) for u in updates)
    values = {f: u.get("value") for f, u in zip(FORM_FIELDS, updates)}
    assert values["rank"] == 16 and values["train_text_encoder"] is False and values["base"] is None
    assert all(u == {"__type__": "update"} for u in by_name["choose"]("auto"))


def test_samples_use_the_host_sampler_and_refuse_lora_tags(tmp_path, model):
    made = []
    tab = TrainTab(get_model=lambda: model, make_sampler=lambda w, h: made.append((w, h)) or (lambda p, s: []),
                   sample_prompts=("red square",), sample_every=2)
    setup = tab.setup(_form(tmp_path))
    assert made == [(64, 64)] and setup.host.sample is not None
    assert setup.settings["sample_prompts"] == ("red square",) and setup.settings["sample_every_steps"] == 2
    tab.sample_prompts = ("red square <lora:other:1>",)
    with pytest.raises(TrainingError, match="LoRA tags cannot be used while training"):
        tab.setup(_form(tmp_path))


def test_half_precision_base_as_a1111_keeps_it(tmp_path, model):
    """A1111 holds the UNet and text encoder in fp16 (VAE often fp32): inputs follow each part's dtype."""
    model.model.half()
    model.cond_stage_model.half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tab = TrainTab(get_model=lambda: model, lock=QueueLock())
    session = TrainSession(UiContext(UiConfig(lora_dirs=(str(tmp_path / "out"),), hash_files=False,
                                                       confine=False)), tab.setup)  # as the tab's context
    st = _run(session, _form(tmp_path, steps=2))
    assert st.state == "done", st.error
    assert all(math.isfinite(v) for v in st.losses)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert load_lora(st.output).modules  # a non-empty file in fp32 kohya layout
