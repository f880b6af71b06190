"""What users type: ``<lora:…>`` prompt tags (:mod:`.prompt`), lora-block-weight vectors and presets
(:mod:`.blocks`), and the ``Lora hashes`` infotext field (:mod:`.infotext`)."""
