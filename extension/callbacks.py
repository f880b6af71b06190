"""Everything A1111 learns about us, registered in one place (called by ``scripts/lora_engine_a1111.py``).

=============================  ==================================================================
callback                       what it does
=============================  ==================================================================
``on_ui_settings``             the "lora-engine" settings section (``settings.register``)
``on_before_ui``               extra network ``lora`` + alias ``lyco`` (after the built-in, which
                               stays installed but idle; order pinned in ``metadata.ini``); the page
``on_before_component``        once per UI build, at its first component (every ``before_ui`` has
                               run, the extra-network tabs are not made yet): takes the tags and the
                               "Lora" page back if another ``before_ui`` registered them after ours
                               (``take_back``: a renamed or symlinked folder, where metadata.ini's
                               order does not apply)
``on_app_started``             REST routes (``api.register``); takes the tags back as above (API-only
                               runs make no component)
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
_UI_BUILD_PENDING = False  # before_ui has run, the UI's first component is not made yet


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

    global _UI_BUILD_PENDING
    _UI_BUILD_PENDING = True
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


def take_back(c: Controller, extra_networks) -> None:
    """After every ``before_ui``: the tags (``claim_tags``) and then one "Lora" page, ours or, while the
    tags are handed back, the built-in's (A1111 registers pages in ``before_ui`` too, so a built-in
    ``before_ui`` that ran after ours added its page beside ours: two "Lora" tabs)."""
    claim_tags(c, extra_networks)
    c.builtin_cards = c.settings().handover and c.builtin is not None
    dropped = page.take_back(c)
    if dropped:
        log.warning("lora-engine: %d other \"Lora\" page(s) registered after lora-engine's were removed", dropped)


def before_component(component, **kwargs) -> None:
    global _UI_BUILD_PENDING
    if not _UI_BUILD_PENDING:
        return
    _UI_BUILD_PENDING = False
    from modules import extra_networks

    take_back(controller(), extra_networks)


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
    cb.on_before_component(before_component)
    cb.on_model_loaded(model_loaded)
    cb.on_cfg_denoiser(lambda params: steps.on_cfg_denoiser(controller(), params))
    cb.on_infotext_pasted(infotext_pasted)
    cb.on_app_started(app_started)
    cb.on_script_unloaded(script_unloaded)


__all__ = ["register", "controller"]
