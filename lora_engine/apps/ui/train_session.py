"""The Train page's state without gradio: one :class:`~lora_engine.train.job.TrainingJob` at a time
on a host built from the form (the demo model, a single-file SD checkpoint, or a diffusers folder), and its
status as text.

``TrainForm`` holds the form's values; ``TrainSession.start`` validates them, builds the host and
the config, starts the job (dataset errors come back as the job's ``failed`` status, one line).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from ...errors import LoraEngineError, TrainingError
from .context import UiContext

FINISHED = ("done", "cancelled", "failed")


@dataclass(frozen=True)
class TrainForm:
    base: str  # "demo" (the built-in demo model), a demo base file, an SD single-file checkpoint, or a diffusers folder
    data_dir: str
    output: str  # name in the output folder
    steps: int = 200
    rank: int = 4
    alpha: float = 4.0
    unet_lr: float = 1e-3
    te_lr: float = 5e-4
    train_text_encoder: bool = False
    batch_size: int = 4
    resolution: int = 512
    seed: int = 42
    tokenizer: str = ""  # single-file checkpoints: a CLIP tokenizer folder ("" = offline HF cache / open_clip)


@dataclass(frozen=True)
class HostSetup:
    """What a host factory gives the session instead of loading ``form.base``: the host, settings under
    the form's (a preset), and the job's ``lock`` (held for the whole run), ``engine`` (its LoRAs are
    taken off while training) and ``stop`` (asked after every step; True cancels the run)."""

    host: object
    settings: dict = field(default_factory=dict)
    lock: object = None
    engine: object = None
    stop: object = None  # () -> bool


def _host_and_dataset(form: TrainForm, device: str) -> tuple[object, dict]:
    from ...train.single_file import is_sd_checkpoint, load_single_file

    base = form.base.strip()
    if os.path.isfile(base) and base.endswith(".safetensors") and is_sd_checkpoint(base):
        return load_single_file(base, device=device, tokenizer=(form.tokenizer or "").strip() or None), \
            {"resolution": int(form.resolution)}
    if base == "demo" or (os.path.isfile(base) and base.endswith(".safetensors")):
        from ..demo.base import get_base
        from ..demo.concept import demo_host
        from ..demo.model import RESOLUTION

        model, _ = get_base(None if base == "demo" else base)
        return demo_host(model), {"resolution": RESOLUTION, "enable_buckets": False, "bucket_step": 1}
    if os.path.isdir(base):
        from ...train.diffusers_host import load_diffusers_folder

        return load_diffusers_folder(base, device=device), {"resolution": int(form.resolution)}
    raise TrainingError(f"base model {base!r}: give 'demo', a demo base .safetensors file, an SD1/SD2/SDXL "
                        "single-file .safetensors checkpoint or a diffusers folder")


def resolved_form(ctx: UiContext, form: TrainForm) -> TrainForm:
    """The form with its paths through the context's path rule (refused before anything is read)."""
    import dataclasses

    tokenizer = (form.tokenizer or "").strip()
    base = ctx.model_path(form.base) if form.base.strip() else ""  # empty where a host brings the model
    return dataclasses.replace(form, base=base, data_dir=ctx.dataset_path(form.data_dir),
                               tokenizer=ctx.model_path(tokenizer) if tokenizer else "")


def build_job(ctx: UiContext, form: TrainForm, host_factory: Callable[[TrainForm], HostSetup] | None = None):
    import torch

    from ...train import build_config
    from ...train.job import TrainingJob

    form = resolved_form(ctx, form)
    if not form.data_dir or not os.path.isdir(form.data_dir):
        raise TrainingError(f"image folder {form.data_dir!r} does not exist")
    output = ctx.output_path(form.output, overwrite=True)  # replaced only where the server allows it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if host_factory is not None:
        setup = host_factory(form)
        host, dataset = setup.host, {"resolution": int(form.resolution)}
    else:
        setup = HostSetup(None)
        host, dataset = _host_and_dataset(form, device)
    dataset["batch_size"] = int(form.batch_size)
    cfg = build_config(setup.settings | {
        "data_dir": form.data_dir.strip(), "output": output, "steps": int(form.steps), "seed": int(form.seed),
        "unet_lr": float(form.unet_lr), "te_lr": float(form.te_lr),
        "output_name": os.path.splitext(os.path.basename(output))[0],
        "network": {"rank": int(form.rank), "alpha": float(form.alpha),
                    "train_text_encoder": bool(form.train_text_encoder)},
        "dataset": dataset,
    })
    return TrainingJob(host, cfg, engine=setup.engine, lock=setup.lock, stop=setup.stop)


def status_text(s) -> str:
    lines = [f"state: {s.state}"]
    if s.total_steps:
        lines.append(f"step {s.step}/{s.total_steps}  epoch {s.epoch}")
    if s.loss is not None:
        lines.append(f"loss {s.loss:.5f}  smoothed {s.smoothed_loss:.5f}")
    if s.it_per_s:
        eta = f"  ETA {s.eta_s:.0f} s" if s.eta_s is not None and s.state == "running" else ""
        lines.append(f"{s.it_per_s:.2f} it/s{eta}")
    if s.error:
        lines.append(f"error: {s.error}")
    if s.output:
        lines.append(f"output: {s.output}")
    lines += [line for line in s.report[:12] if line not in s.log]  # the log usually repeats the report
    lines += list(s.log[-12:])
    return "\n".join(lines)


class TrainSession:
    """At most one running job per UI; a finished one stays readable until the next start."""

    def __init__(self, ctx: UiContext, host_factory: Callable[[TrainForm], HostSetup] | None = None):
        self.ctx = ctx
        self.host_factory = host_factory
        self.job = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def start(self, form: TrainForm) -> str:
        with self._lock:
            if self.job is not None and self.job.status().state not in FINISHED:
                return "a training run is already in progress (cancel it first)"
            self.error = None
            try:
                self.job = build_job(self.ctx, form, self.host_factory)
            except LoraEngineError as e:
                self.job, self.error = None, str(e)
                return f"error: {e}"
            self.job.start()
            return "started"

    def cancel(self) -> str:
        if self.job is None:
            return "nothing is running"
        self.job.cancel()
        return "cancelling after the current step (the last save is written)"

    def status(self):
        """(text, losses, finished)."""
        if self.job is None:
            return (f"error: {self.error}" if self.error else "state: idle"), (), True
        s = self.job.status()
        return status_text(s), s.losses, s.state in FINISHED
