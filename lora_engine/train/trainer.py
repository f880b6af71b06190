"""The training loop, host-independent.

    trainer = Trainer(host, cfg, progress=print)   # validates the dataset: trainer.report
    result = trainer.run(resume=None)              # or resume=trainer.state_path

One optimiser step consumes ``grad_accum`` batches of the stream (``dataset``); the loss and the
noise are those of ``schedule``. The host's weights are frozen and never written: LoRAs ride on
forward hooks that are removed at the end, ``requires_grad`` flags are restored, and LoRAs the
user had applied through a ``LoraEngine`` are taken off first and put back after.

NaN/Inf guard: a step whose loss or gradients are not finite is skipped (weights unchanged); after
``max_bad_steps`` of them in a row training stops. Whenever the run ends on skipped steps (stopped,
cancelled or finished) the weights go back to the last ones whose following step was finite
(:class:`~lora_engine.train.last_good.LastGood`) and those are saved, never the weights the NaN steps
started from. Periodic saves wait for that proof too: a save due after step k is written at the start
of the next finite step, before its update (with the RNG state of that moment, so resuming is exact).
So nothing but the final weights of a run is ever saved unproven, a save never writes NaN/Inf (e.g. fp32
weights beyond fp16's range), and a good earlier save is never replaced by a worse state.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import shapes_of
from ..errors import TrainingError
from ..keymap import build_keymap
from .batches import BatchMaker, seed_of
from .config import TrainConfig
from .dataset import Dataset
from .last_good import LastGood
from .network import TrainNetwork
from .optim import make_optimizer
from .save import DTYPES, save_lora, training_metadata
from .schedule import diffusion_loss, loss_weights, lr_factor, noisy_inputs
from .state import load_state, rng_state, save_state, set_rng_state


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: int
    loss: float
    smoothed_loss: float
    lr: float
    it_per_s: float
    eta_s: float | None
    skipped_steps: int = 0
    message: str = ""


@dataclass
class TrainResult:
    output: str
    steps: int
    losses: list[float]
    cancelled: bool
    state_path: str | None
    metadata: dict = field(default_factory=dict)


def smoothed(losses: list[float], window: int = 25) -> float:
    """Mean of the last ``window`` finite losses (a pure function of the history, so exact on resume)."""
    tail = [x for x in losses[-window:] if math.isfinite(x)]
    return sum(tail) / len(tail) if tail else float("nan")


class Trainer:
    def __init__(self, host, cfg: TrainConfig, progress: Callable[[Progress], None] | None = None,
                 log: Callable[[str], None] | None = None, engine=None):
        if not cfg.output:
            raise TrainingError("no output file given")
        if cfg.dataset.enable_buckets and cfg.dataset.bucket_step % host.latent_factor:
            raise TrainingError(f"bucket_step {cfg.dataset.bucket_step} is not a multiple of the VAE factor "
                                f"{host.latent_factor}")
        self.host, self.cfg, self.engine = host, cfg, engine
        self.progress, self._log = progress, log or (lambda line: None)
        self.dataset = Dataset(cfg.data_dir, cfg.dataset)
        self.report = self.dataset.report
        per_epoch = math.ceil(self.dataset.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.steps or cfg.epochs * per_epoch
        self.report.steps_per_epoch, self.report.total_steps = per_epoch, self.total_steps
        self.report.epochs = self.total_steps / per_epoch
        keymap = build_keymap(shapes_of(host.root))
        self.network = TrainNetwork(host.root, keymap, cfg.network).to(host.device)
        self.te_trained = any(c == "te" for c in self.network.components.values())
        groups = self.network.param_groups(cfg.unet_lr, cfg.te_lr)
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = make_optimizer(cfg.optimizer, groups, cfg.weight_decay, cfg.optimizer_args)
        self.scaler = self._scaler()
        self.last_good = LastGood(self.network.parameters(), self.optimizer, self.scaler)
        self.batches = BatchMaker(host, self.dataset, cfg, cache_text=cfg.cache_text and not self.te_trained)
        self.step, self.losses, self.skipped, self.bad_streak = 0, [], 0, 0
        self.start_step = 0  # where this run began (a resumed run: the saved step)
        self.saved_step: int | None = None  # step of the last write of cfg.output in this run
        self._save_due = False  # a periodic save waiting for the next finite step
        self.samples: list[tuple[int, list]] = []
        self._cancel = threading.Event()
        self.session_id, self.started_at = uuid.uuid4().hex, time.time()
        self.state_path = cfg.output + ".trainstate"

    # ---- setup ---------------------------------------------------------------------------------
    def _scaler(self):
        mp = self.cfg.mixed_precision
        if mp not in ("no", "bf16", "fp16"):
            raise TrainingError(f"mixed_precision must be no, bf16 or fp16, not {mp!r}")
        if mp == "fp16":
            if self.host.device.type != "cuda":
                raise TrainingError("fp16 mixed precision needs a CUDA device; use bf16 on this device")
            return torch.amp.GradScaler("cuda")
        return None

    def _autocast(self):
        mp = self.cfg.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.host.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    @contextlib.contextmanager
    def _prepared(self):
        """Freeze the base, take off engine LoRAs, attach hooks; undo all of it on the way out."""
        root = self.host.root
        flags = [(p, p.requires_grad) for p in root.parameters()]
        stack = list(self.engine.stack) if self.engine is not None else []
        if self.engine is not None and stack:
            self.engine.restore()
        for p, _ in flags:
            p.requires_grad_(False)
        if self.cfg.gradient_checkpointing and self.host.gradient_checkpointing:
            self.host.gradient_checkpointing(True)
        self.network.attach()
        self.network.train()
        try:
            yield
        finally:
            self.network.detach()
            self.network.eval()
            if self.cfg.gradient_checkpointing and self.host.gradient_checkpointing:
                self.host.gradient_checkpointing(False)
            for p, flag in flags:
                p.requires_grad_(flag)
            if self.engine is not None and stack:
                self.engine.set_stack(stack)

    # ---- one step --------------------------------------------------------------------------------
    def _loss(self, k: int) -> torch.Tensor:
        latents, captions, sizes = self.batches.batch(k)
        dev, cfg = self.host.device, self.cfg
        g = torch.Generator().manual_seed(seed_of(cfg.seed, "noise", k))
        noise = torch.randn(latents.shape, generator=g)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g)
        t_max = cfg.max_timestep or len(self.host.alphas_cumprod)
        t = torch.randint(cfg.min_timestep, t_max, (latents.shape[0],), generator=g).to(dev)
        noisy, target = noisy_inputs(latents.to(dev), noise.to(dev), t, self.host.alphas_cumprod,
                                     self.host.prediction_type)
        with self._autocast():
            cond = self.batches.text(captions)
            pred = self.host.denoise(noisy, t, cond, sizes)
        w = loss_weights(t, self.host.alphas_cumprod, cfg.min_snr_gamma, self.host.prediction_type)
        return diffusion_loss(pred, target, w)

    def _grad_norm(self) -> float:
        """Total gradient 2-norm (NaN/Inf if any gradient is); clips to ``max_grad_norm`` when finite."""
        params = [p for p in self.network.parameters() if p.grad is not None]
        if self.cfg.max_grad_norm:
            return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        norms = [torch.linalg.vector_norm(p.grad.float()) for p in params]  # (torch>=2.1; get_total_norm is 2.6+)
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _train_step(self) -> float:
        cfg = self.cfg
        f = lr_factor(cfg.scheduler, self.step, self.total_steps, cfg.warmup_steps, cfg.num_cycles)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f
        rng = rng_state() if self._save_due else None  # the resume state of a save made in this step
        total = 0.0
        for micro in range(cfg.grad_accum):
            loss = self._loss(self.step * cfg.grad_accum + micro) / cfg.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = self._grad_norm()
        if not math.isfinite(total) or (self.scaler is None and not math.isfinite(norm)):
            return self._bad_step(total)
        self.bad_streak = 0
        self.last_good.keep(self.step, self.skipped)  # the weights this finite step started from
        if self._save_due:  # those weights are proven now: the periodic save waited for this
            self._save_due = False
            self.save(intermediate=True, rng=rng)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _bad_step(self, total: float) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.bad_streak += 1
        self._log(f"step {self.step + 1}: loss or gradients are NaN/Inf; step skipped, weights unchanged")
        return float("nan")

    # ---- the loop --------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop after the current step (or the image being cached); the LoRA and state are saved then."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def epoch(self) -> int:
        return self.step * self.cfg.grad_accum // self.dataset.batches_per_epoch

    def run(self, resume: str | None = None) -> TrainResult:
        with self._prepared():
            if resume:
                self._resume(resume)
            self._log("caching latents" if self.cfg.cache_latents else "latents encoded per step")
            self.batches.cache_all(stop=self._cancel.is_set)
            if self._cancel.is_set():
                self._log(f"cancelled at step {self.step}, while caching latents")
                return self._finish(cancelled=True)
            if self.step == 0 and self.report.seconds_per_step is None:
                self.report.seconds_per_step = self._calibrate()
            for line in self.report.lines():
                self._log(line)
            return self._loop()

    def _loop(self) -> TrainResult:
        t0 = time.perf_counter()
        self.start_step = self.step
        while self.step < self.total_steps:
            if self._cancel.is_set():
                self._log(f"cancelled at step {self.step}")
                return self._finish(cancelled=True)
            epoch_before = self.epoch
            loss = self._train_step()
            self.step += 1
            self.losses.append(loss)
            if self.bad_streak >= self.cfg.max_bad_steps:
                self._stop_diverged(loss)
            self._after_step(epoch_before, t0, self.start_step)
        return self._finish(cancelled=False)

    def _stop_diverged(self, loss: float) -> None:
        first, last = self.step - self.bad_streak + 1, self.step
        if self._roll_back_and_save() is not None:
            what = f"saved {self.cfg.output} with the weights after step {self.step}, the last whose next step was finite"
        else:
            what = f"nothing saved: {self._unsaved_reason()}; {self.cfg.output} left as it was"
        raise TrainingError(f"steps {first}-{last} gave NaN/Inf (last loss {loss}); stopped after step {last}; "
                            f"{what}. Lower the learning rate, disable fp16, or check the base model")

    def _unsaved_reason(self) -> str:
        if self.last_good.step is None:
            return "no step of this run was finite"
        if self.start_step == 0:
            return "the last good weights are the untrained ones"
        return f"the last good weights are the ones resumed from step {self.start_step}"

    def _roll_back_and_save(self) -> dict | None:
        """After skipped steps: back to the last good state, written when it is newer than the state this
        run started from and than this run's last save. Returns the metadata written, or None."""
        if self.last_good.step is None:
            return None
        self.last_good.restore()
        self.step, self.skipped, self.bad_streak = self.last_good.step, self.last_good.skipped, 0
        del self.losses[self.step:]
        self._log(f"rolled back to the weights after step {self.step} (the last whose next step was finite)")
        if self.step > max(self.start_step, -1 if self.saved_step is None else self.saved_step):
            return self.save(final=True)
        return None

    def _after_step(self, epoch_before: int, t0: float, start_step: int) -> None:
        cfg = self.cfg
        done = self.step - start_step
        rate = done / max(1e-9, time.perf_counter() - t0)
        if self.progress is not None:
            eta = (self.total_steps - self.step) / rate if rate > 0 else None
            lr = self.optimizer.param_groups[0]["lr"]
            self.progress(Progress(self.step, self.total_steps, self.epoch, self.losses[-1], smoothed(self.losses),
                                    lr, rate, eta, self.skipped))
        by_steps = cfg.save_every_steps and self.step % cfg.save_every_steps == 0
        by_epochs = cfg.save_every_epochs and self.epoch > epoch_before and self.epoch % cfg.save_every_epochs == 0
        if (by_steps or by_epochs) and self.step < self.total_steps:
            self._save_due = True
        if cfg.sample_every_steps and self.host.sample and self.step % cfg.sample_every_steps == 0:
            self._sample()

    def _calibrate(self) -> float:
        """Seconds for one optimiser step, timed on batch 0 with no update and every RNG restored."""
        rng = rng_state()
        t = time.perf_counter()
        for micro in range(self.cfg.grad_accum):
            (self._loss(micro) / self.cfg.grad_accum).backward()
        self.optimizer.zero_grad(set_to_none=True)
        set_rng_state(rng)
        return time.perf_counter() - t

    def _sample(self) -> None:
        rng = rng_state()
        self.network.eval()
        try:
            with torch.no_grad():
                self.samples.append((self.step, self.host.sample(list(self.cfg.sample_prompts), self.step)))
        finally:
            self.network.train()
            set_rng_state(rng)

    # ---- saving and resuming -----------------------------------------------------------------------
    def save(self, intermediate: bool = False, final: bool = False, rng: dict | None = None) -> dict | None:
        """Write the LoRA (and the resume state); returns its metadata. Weights that are not finite in
        ``save_precision`` are never written: None (logged), or a :class:`TrainingError` when ``final``."""
        cfg = self.cfg
        tensors = self.network.kohya_state_dict(DTYPES[cfg.save_precision])
        bad = next((k for k, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            why = (f"{cfg.output} not saved at step {self.step}: {bad} is NaN/Inf in {cfg.save_precision} "
                   f"(largest fp32 weight {self._largest_weight():.3g})")
            if final:
                raise TrainingError(f"{why}; lower the learning rate or use save_precision = fp32")
            self._log(why)
            return None
        meta = training_metadata(cfg, self.network, self.dataset, self.host, self.step, self.total_steps,
                                 self.step * cfg.grad_accum / self.dataset.batches_per_epoch, self.started_at,
                                 self.session_id)
        written = save_lora(cfg.output, tensors, meta)
        self.saved_step = self.step
        if intermediate and cfg.keep_intermediate:
            stem, ext = os.path.splitext(cfg.output)
            save_lora(f"{stem}-step{self.step:06d}{ext}", tensors, meta)
        if cfg.save_state:
            info = {"step": self.step, "losses": self.losses, "skipped": self.skipped, "bad_streak": self.bad_streak,
                    "session_id": self.session_id, "started_at": self.started_at, "config": cfg.to_json(),
                    "items": [it.path for it in self.dataset.items]}
            save_state(self.state_path, self.network, self.optimizer, info, self.scaler, rng)
        self._log(f"saved {cfg.output} at step {self.step}")
        return written

    def _resume(self, path: str) -> None:
        info = load_state(path, self.network, self.optimizer, self.scaler)
        mine = self.cfg.to_json()
        for key in ("seed", "network", "dataset", "grad_accum", "optimizer"):
            if info["config"].get(key) != mine.get(key):
                raise TrainingError(f"{path}: cannot resume: setting {key!r} differs from the saved run")
        if info["items"] != [it.path for it in self.dataset.items]:
            raise TrainingError(f"{path}: cannot resume: the dataset's images changed since the state was saved")
        self.step, self.losses, self.skipped = info["step"], list(info["losses"]), info["skipped"]
        self.bad_streak, self.session_id, self.started_at = info["bad_streak"], info["session_id"], info["started_at"]
        self._log(f"resumed from {path} at step {self.step}")

    def _largest_weight(self) -> float:
        return max((float(p.detach().abs().max()) for p in self.network.parameters() if p.numel()), default=0.0)

    def _finish(self, cancelled: bool) -> TrainResult:
        if self.bad_streak:  # the current weights' next step was NaN/Inf: the last good ones instead
            meta = self._roll_back_and_save()
        else:
            meta = self.save(final=True) if self.step > 0 else None
        state = self.state_path if (self.cfg.save_state and self.saved_step is not None) else None
        return TrainResult(self.cfg.output, self.step, list(self.losses), cancelled, state, meta or {})
