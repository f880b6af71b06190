"""lora-engine as an AUTOMATIC1111 WebUI (1.10) extension: thin glue around ``lora_engine``.

One module per host concept:

- ``batch``: the prompts of one batch -> the LoRA stack of every image (core parser, library, cache);
- ``runtime``: one engine per loaded checkpoint; modes; per-step and per-sample runtime factors;
- ``controller``: process-wide state (settings, library, file cache, current runtime, automatic mode);
- ``network``: the ``lora``/``lyco`` extra network (``activate``/``deactivate`` per batch);
- ``steps``: the cfg-denoiser callback; ``conds``: clearing A1111's conditioning cache;
- ``builtin``: handing tags to/from the built-in Lora without fighting its weight backups;
- ``settings``, ``infotext``, ``api``, ``page``, ``metadata_editor``: settings section, paste hook,
  REST routes, the "Lora" cards page and its user-metadata editor;
- ``callbacks``: the one place that registers everything with ``modules.script_callbacks``.

This folder is imported under the package name ``lora_engine_a1111`` by ``scripts/lora_engine_a1111.py``
(A1111's built-in Lora owns the top-level names ``networks``, ``network``, ``lora``...); inside it only
relative imports are used, so the tests can import it as ``extension``. Nothing here imports A1111
(``modules.*``, ``gradio``) at module level.
"""
PACKAGE_ALIAS = "lora_engine_a1111"
