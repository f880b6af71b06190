"""The embedded default: a small SD-architecture text-to-image model the project trains itself, and
``lora-engine demo``, which teaches it a new concept with a LoRA and shows the LoRA at several weights.

Modules: ``dataset`` (synthetic coloured shapes with captions), ``tokenizer`` (word level),
``model`` (diffusers UNet + transformers CLIP text encoder, pixel space), ``diffusion`` (loss and
DDIM sampler), ``train_base`` (the script that made the shipped weights), ``base`` (where they
come from), ``concept`` (the LoRA, trained with :mod:`lora_engine.train`), ``grid`` and ``run``.
Needs the ``models`` extra (diffusers, transformers, pillow, tqdm).
"""
