"""Clearing A1111's conditioning cache when the text encoder's weights change.

A1111 caches ``c``/``uc`` in class attributes of ``StableDiffusionProcessing``
(``cached_c``, ``cached_uc``) and of ``StableDiffusionProcessingTxt2Img`` (``cached_hr_c``,
``cached_hr_uc``), each ``[params, conds]``, keyed on the prompts and the first prompt's extra
network arguments only (``processing.get_conds_with_caching``). A LoRA change that is not in that key (another image's
tags, negative-prompt tags, a file rewritten on disk, a mode switch) would reuse stale conds.
"""
from __future__ import annotations

CACHE_FIELDS = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")


def clear_cond_cache(p) -> int:
    """Reset every cond cache reachable from ``p`` (its classes and itself); returns how many."""
    n = 0
    for owner in (*type(p).__mro__, p):
        fields = vars(owner) if owner is not p else getattr(p, "__dict__", {})
        for name in CACHE_FIELDS:
            if name in fields and isinstance(fields[name], list):
                setattr(owner, name, [None, None])
                n += 1
    return n


class CondGuard:
    """Remembers what the text encoder computed last and clears the cache when that changes."""

    def __init__(self):
        self.last: object = None

    def update(self, p, signature) -> bool:
        if signature == self.last:
            return False
        self.last = signature
        clear_cond_cache(p)
        return True
