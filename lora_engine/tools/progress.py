"""Progress and cancellation shared by the tools.

``progress(done, total, what)`` is called after each unit of work (a module, a tensor); raising
:class:`~lora_engine.errors.OperationCancelled` from it cancels. ``cancel`` is anything with
``is_set()`` (a ``threading.Event``) or a zero-argument callable returning True to cancel; it is
checked before each unit, so a long loop stops within one module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import OperationCancelled

ProgressFn = Callable[[int, int, str], None]


@dataclass
class Ticker:
    total: int
    progress: ProgressFn | None = None
    cancel: object = None
    done: int = 0

    def cancelled(self) -> bool:
        c = self.cancel
        if c is None:
            return False
        return bool(c.is_set() if hasattr(c, "is_set") else c())

    def check(self) -> None:
        """Raise :class:`OperationCancelled` if the caller asked to stop."""
        if self.cancelled():
            raise OperationCancelled(f"cancelled after {self.done} of {self.total}")

    def tick(self, what: str = "", n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total, what)
        self.check()
