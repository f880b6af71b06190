"""LoRA tools: merge, resize, extract, convert, bake. Each takes ``progress`` and ``cancel``
(see :mod:`lora_engine.tools.progress`) and writes its output atomically."""
