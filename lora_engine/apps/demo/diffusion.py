"""The denoising objective and the sampler of the demo model (diffusers schedulers).

Training (DDPM schedule, v prediction): for an image ``x0``, a uniform timestep ``t`` and noise
``ε ~ N(0, I)``, ``x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε``, ``v = √ᾱ_t·ε - √(1-ᾱ_t)·x0`` and the loss is
``mean((v̂(x_t, t, c) - v)²)``.
A caption is replaced by the empty prompt with probability ``p_uncond`` so that the same
model also predicts the unconditional ``v̂(x_t, t, ∅)``.

Sampling (DDIM, η = 0) with classifier-free guidance:
``v = v̂(x_t, t, ∅) + g·(v̂(x_t, t, c) - v̂(x_t, t, ∅))``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .model import RESOLUTION, SCHEDULER_CONFIG, DemoModel


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def sample_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG, set_alpha_to_one=True, timestep_spacing="trailing")


def drop_captions(captions: list[str], p_uncond: float, gen: torch.Generator) -> list[str]:
    keep = torch.rand(len(captions), generator=gen) >= p_uncond
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def noise_loss(model: DemoModel, scheduler, x0: torch.Tensor, captions: list[str],
               gen: torch.Generator, p_uncond: float = 0.0) -> torch.Tensor:
    """The v-prediction MSE on one batch (noise and timesteps drawn from ``gen``)."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    xt = scheduler.add_noise(x0, noise, t)
    context = model.encode(drop_captions(captions, p_uncond, gen) if p_uncond else captions)
    return torch.nn.functional.mse_loss(model(xt, t, context), scheduler.get_velocity(x0, noise, t))


@torch.no_grad()
def sample(model: DemoModel, prompts: list[str], seed: int, steps: int = 20, guidance: float = 3.0,
           callback: Callable[[int], None] | None = None, negative: str = "") -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1]; image ``i`` starts from noise seeded ``seed + i``, so a
    prompt's picture does not depend on the batch it is in. ``callback(step)`` after each step.
    ``negative`` takes the place of ∅ in the guidance formula (empty: the unconditional prediction)."""
    sched = sample_scheduler()
    sched.set_timesteps(steps)
    x = torch.stack([torch.randn(3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed + i))
                     for i in range(len(prompts))])
    cond = model.encode(prompts)
    uncond = model.encode([negative] * len(prompts))
    context = torch.cat([uncond, cond])
    for i, t in enumerate(sched.timesteps):
        v_u, v_c = model(torch.cat([x, x]), t.expand(2 * len(prompts)), context).chunk(2)
        x = sched.step(v_u + guidance * (v_c - v_u), t, x).prev_sample
        if callback is not None:
            callback(i)
    return ((x + 1) / 2).clamp(0, 1)
