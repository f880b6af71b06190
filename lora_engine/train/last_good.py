"""The last good training state, for the NaN/Inf guard.

A step whose loss or gradients are NaN/Inf is skipped and leaves the weights as they are, but those
weights may already be ruined: with a learning rate of 1e6 the first step is finite and applied
(weights ~1e6), and every step after it is NaN. So "the weights now" is not a safe thing to save.

``LastGood`` holds a copy of the LoRA weights, the optimiser state (and the grad scaler's) taken just
before an update whose step was finite: the last weights whose *following* step was finite. Rolling
back restores exactly that state, so a save after the rollback is a state training can resume from.
The copy goes into buffers allocated once; the optimiser state is a deep copy (a few times the LoRA's size).
"""
from __future__ import annotations

import copy

import torch


class LastGood:
    def __init__(self, params, optimizer, scaler=None):
        self.params = [p for p in params]
        self.optimizer, self.scaler = optimizer, scaler
        self.step: int | None = None  # the trainer's step count when the copy was taken
        self.skipped = 0  # skipped steps up to then
        self._weights: list[torch.Tensor] | None = None
        self._optimizer_state: dict | None = None
        self._scaler_state: dict | None = None

    def keep(self, step: int, skipped: int) -> None:
        """Copy the current state: the step that starts from it was finite."""
        with torch.no_grad():
            if self._weights is None:
                self._weights = [p.detach().clone() for p in self.params]
            else:
                for buf, p in zip(self._weights, self.params):
                    buf.copy_(p)
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self._scaler_state = self.scaler.state_dict() if self.scaler is not None else None
        self.step, self.skipped = step, skipped

    def restore(self) -> None:
        """Put the copied weights and optimiser state back (no-op when nothing was kept)."""
        if self._weights is None:
            return
        with torch.no_grad():
            for p, buf in zip(self.params, self._weights):
                p.copy_(buf)
        self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))  # never alias the copy
        if self.scaler is not None and self._scaler_state is not None:
            self.scaler.load_state_dict(self._scaler_state)
