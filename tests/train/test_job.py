"""TrainingJob: background run with polling status, cancellation with a usable save, failures as status."""
from __future__ import annotations

import os
import threading

from lora_engine.formats import load_lora
from lora_engine.train import build_config
from lora_engine.train.job import TrainingJob
from tests.train.models import make_dataset, tiny_parts


def _cfg(tmp_path, **kw):
    data = make_dataset(str(tmp_path / "data"), 2)
    return build_config(dict(data_dir=data, output=str(tmp_path / "job.safetensors"), resolution=32, bucket_step=8,
                             steps=4, rank=2, alpha=1) | kw)


def test_job_runs_reports_and_samples(tmp_path):
    host = tiny_parts(str(tmp_path)).host()
    host.sample = lambda prompts, step: [f"{p}@{step}" for p in prompts]  # a host's sampler returns images
    lock = threading.Lock()
    job = TrainingJob(host, _cfg(tmp_path, sample_every_steps=2, sample_prompts=["red square"]), lock=lock)
    assert job.status().state == "idle"
    job.start()
    assert job.wait(120)
    st = job.status()
    assert st.state == "done", st.error
    assert st.step == 4 and len(st.losses) == 4 and st.eta_s == 0 and st.output.endswith("job.safetensors")
    assert st.samples == ((2, ["red square@2"]), (4, ["red square@4"]))
    assert any("buckets: 32x32: 2" in line for line in st.report) and not lock.locked()
    assert load_lora(st.output).metadata["ss_steps"] == "4"


def test_job_cancel_leaves_usable_save(tmp_path):
    host = tiny_parts(str(tmp_path)).host()
    holder = {}
    job = TrainingJob(host, _cfg(tmp_path, steps=50), on_progress=lambda p: p.step == 2 and holder["job"].cancel())
    holder["job"] = job
    job.start()
    assert job.wait(120)
    st = job.status()
    assert st.state == "cancelled" and st.step == 2
    assert load_lora(st.output).metadata["ss_steps"] == "2" and os.path.isfile(st.output + ".trainstate")


def test_job_failure_is_a_status(tmp_path):
    host = tiny_parts(str(tmp_path)).host()
    cfg = build_config(dict(data_dir=str(tmp_path / "none"), output=str(tmp_path / "x.safetensors")))
    job = TrainingJob(host, cfg)
    job.start()
    assert job.wait(60)
    st = job.status()
    assert st.state == "failed" and st.error.endswith("none: dataset folder does not exist")


def test_diffusers_host_samples_preview_images(tmp_path):
    from lora_engine.train.diffusers_host import diffusers_host

    parts = tiny_parts(str(tmp_path))
    host = diffusers_host(parts.unet, [parts.text_encoder], [parts.tokenizer], parts.vae,
                          parts.scheduler.alphas_cumprod, scheduler_config=parts.scheduler.config, sample_size=16)
    a = host.sample(["red square", "blue background"], 0)
    b = host.sample(["red square"], 5)
    assert [im.size for im in a] == [(16, 16), (16, 16)] and a[0].tobytes() == b[0].tobytes()
    assert a[0].tobytes() != a[1].tobytes()
