"""Living next to A1111's built-in Lora extension: it stays installed, we take over its tags (docs/hosts.md).

We register ``lora``/``lyco`` after the built-in, so its ``ExtraNetworkLora`` is never activated and
its class-level forward patches see an empty ``networks.loaded_networks`` (they then touch
nothing). Two moments still need care, or one side would back up the other's deltas as "original":

- taking the tags over after the built-in was active: its merged deltas are put back from *its*
  backups (``networks.network_restore_weights_from_backup``) and its list emptied, before we write;
- handing the tags back (setting ``lora_engine_handover``): our engine restores first, then the
  built-in's ``activate`` runs as if we were not there.
"""
from __future__ import annotations

import sys

import torch


def builtin_networks():
    """The built-in's ``networks`` module when it is loaded (A1111 imports it as a top-level name)."""
    mod = sys.modules.get("networks")
    if mod is None or not hasattr(mod, "loaded_networks") or not hasattr(mod, "network_restore_weights_from_backup"):
        return None
    return mod


@torch.no_grad()
def release_builtin(model: torch.nn.Module, networks=None) -> int:
    """Undo whatever the built-in merged into ``model``; returns the number of layers restored.

    Then its backups are dropped: with nothing merged (``network_current_names == ()``) they equal the
    weights, and the built-in takes a fresh one from the (original) weights the next time it merges.
    Kept, they would sit beside ours — on SDXL two full sets of backups ran a 24 GB machine out of
    memory in a real A1111 1.10.1 after a hand-back and a take-over."""
    networks = networks or builtin_networks()
    if networks is None:
        return 0
    networks.loaded_networks.clear()
    n = 0
    for module in model.modules():
        if getattr(module, "network_current_names", ()):
            networks.network_restore_weights_from_backup(module)
            module.network_current_names = ()
            n += 1
        if getattr(module, "network_weights_backup", None) is not None and not module.network_current_names:
            module.network_weights_backup = None
            module.network_bias_backup = None
    return n


def find_builtin(registry: dict, ours) -> object | None:
    """The extra network registered as ``lora`` before us (the built-in), if any."""
    other = registry.get("lora")
    return None if other is None or other is ours else other
