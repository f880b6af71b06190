"""Front-ends over the core: the command line (:mod:`.cli`), the standalone web UI (:mod:`.ui`),
the embedded demo (:mod:`.demo`) and text-to-image on a diffusers folder (:mod:`.generate`).
Nothing in the core imports from here; the host adapters (A1111 ``extension/``, ComfyUI
``comfy_nodes/``) sit beside this package, outside ``lora_engine/``."""
