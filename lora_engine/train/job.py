"""A training run on a background thread, for front ends that poll (gradio tabs, ComfyUI nodes).

    job = TrainingJob(host, cfg, lock=shared.queue_lock)   # lock: held for the whole run
    job.start(); ...; job.status()  # -> JobStatus (state, step, loss history, ETA, samples, log)
    job.cancel()                    # stops after the current step; the last save is written
    TrainingJob(..., stop=lambda: shared.state.interrupted)  # polled after every step: True -> cancel()

``state`` goes idle → validating → running → done | cancelled | failed. Any
``LoraEngineError`` (bad dataset, NaN that persists, bad settings) ends in ``failed`` with its
one-line message in ``error``; nothing is raised into the UI thread.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..errors import LoraEngineError
from .trainer import Progress, Trainer, TrainResult


@dataclass(frozen=True)
class JobStatus:
    state: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    smoothed_loss: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    losses: tuple = ()
    samples: tuple = ()  # (step, images) pairs from host.sample
    report: tuple = ()  # dataset report lines
    log: tuple = ()
    error: str | None = None
    output: str | None = None


@dataclass
class _Live:
    state: str = "idle"
    progress: Progress | None = None
    log: list[str] = field(default_factory=list)
    error: str | None = None
    result: TrainResult | None = None


class TrainingJob:
    def __init__(self, host, cfg, engine=None, lock=None, resume: str | None = None,
                 on_progress: Callable[[Progress], None] | None = None, stop: Callable[[], bool] | None = None):
        self.host, self.cfg, self.engine, self.resume = host, cfg, engine, resume
        self.stop = stop  # a host's stop button (A1111's Interrupt), asked after every step
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.on_progress = on_progress
        self.trainer: Trainer | None = None
        self._live = _Live()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            raise LoraEngineError("this training job was already started")
        self._thread = threading.Thread(target=self._run, name="lora-engine-train", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()
        if self.trainer is not None:
            self.trainer.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def _progress(self, p: Progress) -> None:
        with self._mutex:
            self._live.progress = p
        if self.stop is not None and not self._cancel.is_set() and self.stop():
            self._log(f"stop requested by the host at step {p.step}")
            self.cancel()
        if self.on_progress is not None:
            self.on_progress(p)

    def _log(self, line: str) -> None:
        with self._mutex:
            self._live.log.append(line)

    def _run(self) -> None:
        try:
            self._set("validating")
            with self.lock:
                self.trainer = Trainer(self.host, self.cfg, progress=self._progress, log=self._log, engine=self.engine)
                if self._cancel.is_set():
                    self.trainer.cancel()
                self._set("running")
                result = self.trainer.run(resume=self.resume)
            with self._mutex:
                self._live.result = result
                self._live.state = "cancelled" if result.cancelled else "done"
        except LoraEngineError as e:
            self._fail(str(e))
        except Exception as e:  # a UI thread must see every failure as a status, never a dead job
            self._fail(f"{type(e).__name__}: {e}")

    def _set(self, state: str) -> None:
        with self._mutex:
            self._live.state = state

    def _fail(self, message: str) -> None:
        with self._mutex:
            self._live.state, self._live.error = "failed", message
            self._live.log.append(f"failed: {message}")

    def status(self) -> JobStatus:
        with self._mutex:
            live = self._live
            p, tr = live.progress, self.trainer
            losses = tuple(tr.losses) if tr is not None else ()
            return JobStatus(
                state=live.state, step=p.step if p else (tr.step if tr else 0),
                total_steps=tr.total_steps if tr else 0, epoch=p.epoch if p else 0,
                loss=p.loss if p else None, smoothed_loss=p.smoothed_loss if p else None,
                it_per_s=p.it_per_s if p else None, eta_s=p.eta_s if p else None, losses=losses,
                samples=tuple(tr.samples) if tr else (), report=tuple(tr.report.lines()) if tr else (),
                log=tuple(live.log), error=live.error, output=live.result.output if live.result else None)
