"""Everything A1111 learns about us, registered in one place (called by ``scripts/lora_engine_a1111.py``).

=============================  ==================================================================
callback                       what it does
=============================  ==================================================================
``on_ui_settings``             the "lora-engine" settings section (``settings.register``)
``on_before_ui``               extra network ``lora`` + alias ``lyco`` (after the built-in, which
                               stays installed but idle; order pinned in ``metadata.ini``); the page
``on_app_started``             REST routes (``api.register``); takes the tags back if another
                               ``before_ui`` registered ``lora`` after ours (``claim_tags``)
``on_model_loaded``            new weights: drop the old engine (its backups hold the old weights)
``on_cfg_denoiser``            per-step factors / re-merges (``steps.on_cfg_denoiser``)
``on_infotext_pasted``         ``<lora:NAME`` -> local file by ``Lora hashes``
``on_script_unloaded``         UI reload: remove our patches and hooks
=============================  ==================================================================
"""
from __future__ import annotations

import logging

from . import api, infotext, page, settings, steps
from .controller import Controller
from .network import LoraNetwork, make_extra_network

log = logging.getLogger("lora_engine")
_CONTROLLER: Controller | None = None


def controller() -> Controller:
    """The process-wide controller, built from A1111's opts and LoRA folders on first use."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from modules import paths, shared

        folders = settings.a1111_folders(shared.cmd_opts, getattr(paths, "models_path", None))
        _CONTROLLER = Controller(shared.opts, folders)
    return _CONTROLLER


def before_ui() -> None:
    from modules import extra_networks

    c = controller()
    body = LoraNetwork(c)
    ours = make_extra_network(body)
    c.builtin = extra_networks.extra_network_registry.get("lora")  # the built-in, registered before us
    c.network = ours
    if c.settings().handover and c.builtin is not None:
        log.info("lora-engine: <lora> tags handed to the built-in Lora (setting lora_engine_handover)")
    extra_networks.register_extra_network(ours)  # every activation decides handover at run time
    extra_networks.register_extra_network_alias(ours, "lyco")
    c.builtin_cards = c.settings().handover and c.builtin is not None
    if not c.builtin_cards:
        page.register(c)


def model_loaded(sd_model) -> None:
    controller().model_loaded(sd_model)


def infotext_pasted(infotext_text: str, params: dict) -> None:
    for note in infotext.on_infotext_pasted(controller(), infotext_text, params):
        log.warning("lora-engine: %s", note)


def claim_tags(c: Controller, extra_networks) -> bool:
    """Make sure ``<lora:…>``/``<lyco:…>`` reach our network. A1111 1.10 calls the ``before_ui``
    callbacks in reverse order of its sorted list; ``metadata.ini`` puts ours last, but its section only
    matches when the folder is named ``lora-engine`` (A1111 names extensions by folder). If the built-in
    (or anything else) registered ``lora`` after us, take it back here and remember it as the built-in,
    so the hand-back setting still reaches it. Returns True when the tags had to be taken back."""
    registry = extra_networks.extra_network_registry
    if c.network is None or registry.get("lora") is c.network:
        return False
    c.builtin = registry.get("lora")
    extra_networks.register_extra_network(c.network)
    extra_networks.register_extra_network_alias(c.network, "lyco")
    log.warning("lora-engine: another extension registered <lora> after lora-engine (callback order: keep the "
                "folder name extensions/lora-engine); lora-engine takes the tags back")
    return True


def app_started(demo, app) -> None:
    from modules import extra_networks

    claim_tags(controller(), extra_networks)
    api.register(controller(), app)


def script_unloaded() -> None:
    global _CONTROLLER
    if _CONTROLLER is not None and _CONTROLLER.runtime is not None:
        _CONTROLLER.runtime.clear()
    _CONTROLLER = None


def register() -> None:
    from modules import script_callbacks as cb

    cb.on_ui_settings(settings.register)
    cb.on_before_ui(before_ui)
    cb.on_model_loaded(model_loaded)
    cb.on_cfg_denoiser(lambda params: steps.on_cfg_denoiser(controller(), params))
    cb.on_infotext_pasted(infotext_pasted)
    cb.on_app_started(app_started)
    cb.on_script_unloaded(script_unloaded)


__all__ = ["register", "controller"]
