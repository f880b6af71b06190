"""The per-step hook: A1111 calls ``on_cfg_denoiser`` callbacks before every denoiser call with
``CFGDenoiserParams`` (``x``: the denoiser batch, ``sampling_step``, ``total_sampling_steps``).
Here that becomes one call into the current model's runtime, which sets the runtime factors of
this step (on the fly) or re-merges a LoRA whose ``start=``/``stop=`` step was reached (merged)."""
from __future__ import annotations


def on_cfg_denoiser(controller, params) -> None:
    runtime = controller.runtime
    if runtime is None or runtime.batch is None:
        return
    runtime.on_step(int(params.sampling_step), int(params.total_sampling_steps), int(params.x.shape[0]))
