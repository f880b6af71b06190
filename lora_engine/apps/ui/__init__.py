"""The web UI (gradio), shared by ``lora-engine serve`` and host tabs.

Pure parts (no gradio import): ``context`` (folders, library, output paths), ``cards`` (library cards
as HTML, search), ``tool_ops`` (the Tools page's operations), ``train_session`` (training jobs and
their status), ``sweep`` (weight-sweep grids), ``lossplot``. Gradio parts: ``compat`` (the only
module that branches on gradio's version), ``progress``, and one ``*_page`` module per page with a
``build_*_page(ctx)`` that adds components to the caller's Blocks; ``app`` assembles them.
"""
