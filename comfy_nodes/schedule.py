"""Step-scheduled strengths through ComfyUI's hooks (``comfy/hooks.py``), not per-step re-patching.

A scheduled LoRA becomes one ``WeightHook`` whose ``weights``/``weights_clip`` are already our
patch dicts (``need_weight_init = False``, as ComfyUI's own ``create_hook_model_as_lora``), with a
``HookKeyframeGroup``: strength 0 before the start, 1 from the start, 0 from the stop. ComfyUI
multiplies each patch's strength by the current keyframe's and re-computes the hooked weights
only when the keyframe changes; our adapter is linear in that strength.

Steps to percent: ComfyUI keyframes start at a fraction of the sampling schedule; step N
(1-based) of T starts at ``(N−1)/T``. A tag's ``start=``/``stop=`` (:class:`lora_engine.syntax.prompt.StepPoint`)
is converted with the node's ``steps`` by :meth:`lora_engine.syntax.prompt.StepWindow.fractions`;
without it a fraction f is used as is and whole step numbers cannot be placed (the caller warns).
"""
from __future__ import annotations


def keyframes(start: float | None, stop: float | None) -> list[tuple[float, float]]:
    """``[(strength multiplier, start_percent), ...]`` for a LoRA active on ``[start, stop)``."""
    s = 0.0 if start is None else min(max(float(start), 0.0), 1.0)
    e = 1.0 if stop is None else min(max(float(stop), 0.0), 1.0)
    out = []
    if s > 0.0:
        out.append((0.0, 0.0))
    out.append((1.0 if e > s else 0.0, s))
    if s < e < 1.0:
        out.append((0.0, e))
    return out


def hook_group(model_patches: dict, clip_patches: dict, frames: list[tuple[float, float]], previous=None):
    """A ComfyUI ``HookGroup`` with one ``WeightHook`` carrying our patches on these keyframes,
    combined with ``previous`` (a HookGroup or None). Needs ComfyUI (``ImportError`` otherwise)."""
    import comfy.hooks as hooks

    group = hooks.HookGroup()
    hook = hooks.WeightHook(strength_model=1.0, strength_clip=1.0)
    hook.weights, hook.weights_clip, hook.need_weight_init = dict(model_patches), dict(clip_patches), False
    group.add(hook)
    kf = hooks.HookKeyframeGroup()
    for strength, start in frames:
        kf.add(hooks.HookKeyframe(strength=strength, start_percent=start))
    group.set_keyframes_on_hooks(kf)
    return group if previous is None else previous.clone_and_combine(group)


def attach(conditioning, group):
    """Conditioning carrying ``group`` (the hooks then apply only while sampling that cond)."""
    import comfy.hooks as hooks

    return hooks.set_hooks_for_conditioning(conditioning, group)
