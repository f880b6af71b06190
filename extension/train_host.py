"""A :class:`~lora_engine.train.host.TrainHost` over the checkpoint A1111 has loaded (ldm ``LatentDiffusion``
or sgm ``DiffusionEngine``), using the model's own modules and calling conventions (docs/hosts.md):

- ``root`` = ``sd_model``: its parameter names (``model.diffusion_model.*``, ``cond_stage_model.*`` /
  ``conditioner.embedders.N.*``, with or without the hijack's ``.wrapped``) are what the engine's key
  map reads, so the saved kohya names are the ones the engine maps back onto this model;
- denoiser: ``sd_model.model.diffusion_model(x, timesteps, context=c[, y=vector])`` (ldm ``UNetModel``);
- text, SD1/SD2: ``sd_model.cond_stage_model(captions)`` (A1111's hijack: 75-token chunks, clip skip
  from its settings, the same conditioning generation uses, emphasis syntax included);
- text, SDXL: every ``conditioner`` embedder whose ``input_key`` is ``"txt"`` on the captions; 3-D outputs
  concatenated on features -> ``context``, 2-D outputs -> ``pooled``; the size embedders
  (``original_size_as_tuple``, ``crop_coords_top_left`` = (0, 0), ``target_size_as_tuple``) are run per
  batch in ``denoise`` on the bucket (h, w): ``y = [pooled, emb_orig(h, w), emb_crop(0, 0), emb_target(h, w)]``
  in embedder order, as sgm's ``GeneralConditioner`` concatenates its "vector" outputs;
- latents: ``z = scale_factor · sample(first_stage_model.encode(x))`` (ldm returns a diagonal Gaussian,
  sampled here as ``mean + std · ε`` with the trainer's generator; sgm returns the sample itself);
- ``alphas_cumprod`` = ``sd_model.alphas_cumprod`` (ldm buffer; A1111 sets it on sgm models);
  ``parameterization`` ``"eps"`` / ``"v"`` -> ``epsilon`` / ``v_prediction``.

Nothing here imports A1111: the model object is all it needs, so tests drive it with a stand-in.
The run's place in A1111's queue (:func:`queue_job`) and its Interrupt button (:func:`interrupted`) take
``modules.call_queue.queue_lock`` and ``shared.state`` as arguments for the same reason.
"""
from __future__ import annotations

import contextlib

import torch

from lora_engine.errors import TrainingError
from lora_engine.train.host import Cond, TrainHost

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


def prediction_type(sd_model) -> str:
    p = getattr(sd_model, "parameterization", "eps")
    if p not in PREDICTION:
        raise TrainingError(f"the loaded model's parameterization {p!r} cannot be trained (eps or v)")
    return PREDICTION[p]


def base_model_version(sd_model, prediction: str) -> str:
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return "sdxl_base_v1-0"
    if getattr(sd_model, "is_sd2", False):
        return "sd_v2_768_v" if prediction == "v_prediction" else "sd_v2"
    return "sd_v1"


def _as_list(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _sdxl_text(conditioner):
    """``encode_text`` for sgm: the ``"txt"`` embedders' 3-D outputs -> context, 2-D -> pooled."""
    text_embedders = [e for e in conditioner.embedders if getattr(e, "input_key", None) == "txt"]
    if not text_embedders:
        raise TrainingError("the loaded SDXL model's conditioner has no text embedder (input_key 'txt')")

    def encode_text(captions: list[str]) -> Cond:
        ctx, vec = [], []
        for emb in text_embedders:
            for t in _as_list(emb(list(captions))):
                (ctx if t.dim() == 3 else vec).append(t)
        return Cond(torch.cat(ctx, dim=-1), torch.cat(vec, dim=-1) if vec else None)

    return encode_text


def _size_vector(conditioner, sizes, device, dtype) -> list[torch.Tensor]:
    """Outputs of the size embedders for buckets ``sizes`` [(w, h)], in embedder order."""
    out = []
    for emb in conditioner.embedders:
        key = getattr(emb, "input_key", None)
        if key not in SIZE_KEYS:
            continue
        rows = [(0, 0) if key == "crop_coords_top_left" else (h, w) for (w, h) in sizes]
        out.append(emb(torch.tensor(rows, device=device)).to(dtype))
    return out


def _latents(first_stage, scale: float, device):
    def encode_image(pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        dtype = next(first_stage.parameters()).dtype
        out = first_stage.encode(pixels.to(device=device, dtype=dtype))
        if not isinstance(out, torch.Tensor):  # ldm DiagonalGaussianDistribution (.mean, .std)
            noise = torch.randn(out.mean.shape, generator=generator, device=out.mean.device, dtype=out.mean.dtype)
            out = out.mean + out.std * noise
        return (out * scale).float()

    return encode_image


def latent_factor(first_stage) -> int:
    """Pixels per latent cell: ``2^(levels − 1)`` of the ldm/sgm encoder (``num_resolutions``), else 8."""
    levels = getattr(getattr(first_stage, "encoder", None), "num_resolutions", None)
    return 2 ** (int(levels) - 1) if isinstance(levels, int) and levels > 0 else 8


def a1111_train_host(sd_model, model_name: str = "") -> TrainHost:
    """The host over ``sd_model`` (A1111's ``shared.sd_model``); nothing is copied."""
    unet = sd_model.model.diffusion_model
    conditioner = getattr(sd_model, "conditioner", None)
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    if conditioner is not None:
        encode_text = _sdxl_text(conditioner)
        text_encoders = tuple(e for e in conditioner.embedders if getattr(e, "input_key", None) == "txt")
    else:
        te = sd_model.cond_stage_model

        def encode_text(captions: list[str]) -> Cond:
            return Cond(te(list(captions)))

        text_encoders = (te,)

    def denoise(latents, t, cond: Cond, sizes):
        kwargs = {}
        if conditioner is not None:
            parts = [] if cond.pooled is None else [cond.pooled.to(dtype)]
            kwargs["y"] = torch.cat(parts + _size_vector(conditioner, sizes, latents.device, dtype), dim=-1)
        return unet(latents.to(dtype), t, context=cond.context.to(dtype), **kwargs)

    prediction, first_stage = prediction_type(sd_model), sd_model.first_stage_model
    return TrainHost(root=sd_model, denoise=denoise, encode_text=encode_text,
                     encode_image=_latents(first_stage, float(sd_model.scale_factor), device),
                     alphas_cumprod=sd_model.alphas_cumprod.detach().float().cpu(), prediction_type=prediction,
                     latent_factor=latent_factor(first_stage), base_model_version=base_model_version(sd_model, prediction),
                     model_name=model_name, device=device, text_encoders=text_encoders, unet=unet)


def interrupted(state) -> bool:
    """A1111's Interrupt button was pressed: ``shared.state.interrupted`` (``state.interrupt()`` sets it,
    ``state.begin()`` clears it). Skip (``state.skipped``) skips one image of a batch: not a stop."""
    return bool(getattr(state, "interrupted", False))


@contextlib.contextmanager
def queue_job(lock, state, job: str = "lora-engine training"):
    """Hold A1111's queue lock for the run and make it the web UI's current job, as ``wrap_gradio_gpu_call``
    does: ``state.begin(job)`` once the lock is ours (clearing an Interrupt left from an earlier generation,
    which A1111 only clears at the next begin), ``state.end()`` before it is released."""
    with lock if lock is not None else contextlib.nullcontext():
        state.begin(job=job)
        try:
            yield
        finally:
            state.end()
