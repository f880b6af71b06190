"""Stand-ins for the models A1111 holds, for the training tab's tests (A1111 cannot be installed here).

Every stand-in has the parameter names of ``tests.fixtures.models.hosts.a1111_root(tiny, wrapped=True)`` (the tests
check it): the ldm/sgm views whose leaves ARE a diffusers UNet's and HF CLIP's modules. The views have no
forward, so each stand-in's forward runs the diffusers/transformers model behind it, with A1111's calling
convention:

- ``LatentDiffusion`` (ldm, SD1): ``model.diffusion_model(x, timesteps, context)`` (``standin.LdmUNet``),
  ``cond_stage_model(texts)`` (the hijack wrapper, ``standin.HijackedCLIP``);
- ``DiffusionEngine`` (sgm, SDXL): ``model.diffusion_model(x, timesteps, context, y)``: ldm adds
  ``label_emb(y)`` to the time embedding, which is what diffusers' ``add_embedding`` does with
  ``[text_embeds, time_embeds]``, so ``y`` is fed to ``add_embedding`` by a pre-hook for that one call;
  ``conditioner.embedders``: 0 = CLIP-L (``input_key`` "txt", penultimate hidden state), 1 = OpenCLIP-G
  (names: the fused-layout copy ``OpenCLIPText.from_hf``; numbers: the HF model it was copied from;
  returns ``(penultimate hidden state, pooled projection)`` like A1111's ``return_pooled`` wrapper),
  2-4 = size embedders (``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple``):
  the sinusoidal embedding of each number, i.e. the UNet's ``add_time_proj`` on the flattened pair;
- both: ``first_stage_model.encode(x)`` -> a diagonal Gaussian (diffusers' has ldm's ``mean``/``std``),
  ``alphas_cumprod`` = ldm's scaled-linear β schedule (0.00085 → 0.012, 1000 steps), ``scale_factor``.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from tests.hosts.a1111.standin import HijackedCLIP, LdmUNet, tokenize
from tests.fixtures.models.hosts import nested_clip
from tests.fixtures.models.openclip import OpenCLIPText
from tests.train.models import tiny_scheduler


def tiny_vae_x8():
    """A 4-level AutoencoderKL: 8 pixels per latent cell, as SD's."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64).eval()


class FirstStage(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, x):
        return self.vae.encode(x).latent_dist


class _Common(nn.Module):
    def _finish(self, vae, scale: float, parameterization: str):
        self.first_stage_model = FirstStage(vae)
        self.register_buffer("alphas_cumprod", tiny_scheduler().alphas_cumprod.clone())
        self.scale_factor = scale
        self.parameterization = parameterization
        self.requires_grad_(False)


class LatentDiffusion(_Common):
    def __init__(self, tiny, vae, parameterization: str = "eps"):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = LdmUNet(tiny.unet)
        self.cond_stage_model = HijackedCLIP(tiny.text_encoders[0])
        self.is_sd1, self.is_sdxl = True, False
        self._finish(vae, 0.18215, parameterization)


class SgmUNet(LdmUNet):
    def forward(self, x, timesteps=None, context=None, y=None):
        unet = self._unet[0]
        n_text = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        dummy = {"text_embeds": torch.zeros(x.shape[0], n_text, dtype=x.dtype),
                 "time_ids": torch.zeros(x.shape[0], 6, dtype=x.dtype)}
        handle = unet.add_embedding.register_forward_pre_hook(lambda m, a: (y.to(a[0].dtype),))
        try:
            return unet(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=dummy).sample
        finally:
            handle.remove()


def _penultimate(te, texts):
    c = te.config
    out = te(input_ids=tokenize(texts, c.max_position_embeddings, c.vocab_size), output_hidden_states=True)
    return out.hidden_states[-2], out


class ClipL(nn.Module):
    input_key = "txt"

    def __init__(self, te):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = nested_clip(te)
        self._te = [te]

    def forward(self, texts):
        return _penultimate(self._te[0], texts)[0]


class ClipG(nn.Module):
    input_key = "txt"

    def __init__(self, te):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.model = OpenCLIPText.from_hf(te)
        self._te = [te]

    def forward(self, texts):
        h, out = _penultimate(self._te[0], texts)
        return h, out.text_embeds


class SizeEmbedder(nn.Module):
    def __init__(self, input_key: str, proj):
        super().__init__()
        self.input_key = input_key
        self._proj = [proj]

    def forward(self, x):
        return self._proj[0](x.flatten()).reshape(x.shape[0], -1)


class DiffusionEngine(_Common):
    def __init__(self, tiny, vae, parameterization: str = "eps"):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = SgmUNet(tiny.unet)
        self.conditioner = nn.Module()
        sizes = [SizeEmbedder(k, tiny.unet.add_time_proj) for k in
                 ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
        self.conditioner.embedders = nn.ModuleList([ClipL(tiny.text_encoders[0]), ClipG(tiny.text_encoders[1]),
                                                    *sizes])
        self.is_sd1, self.is_sdxl = False, True
        self._finish(vae, 0.13025, parameterization)


class QueueLock:
    """``modules.call_queue.queue_lock``: a lock used as a context manager; counts acquisitions."""

    def __init__(self):
        self._lock = threading.Lock()
        self.acquired = 0

    def __enter__(self):
        self._lock.acquire()
        self.acquired += 1
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class State:
    """``modules.shared_state.State`` (``shared.state``), the parts a training run touches: the Interrupt and
    Skip buttons call ``interrupt()`` / ``skip()``; ``begin(job)`` clears both flags and names the job (the
    only place A1111 clears them), ``end()`` clears the name."""

    skipped = False
    interrupted = False
    job = ""

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def begin(self, job: str = "(unknown)"):
        self.skipped = False
        self.interrupted = False
        self.job = job

    def end(self):
        self.job = ""
