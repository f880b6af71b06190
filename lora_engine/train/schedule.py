"""Learning-rate schedules and the diffusion loss (sd-scripts ``train_network.py``: ``--lr_scheduler``,
``--noise_offset``, ``--min_snr_gamma``, ``--v_parameterization``).

LR factor at optimizer step n (0-based) with warm-up w and total N (diffusers' definitions):
    warm-up (n < w):          n / w
    constant:                 1
    linear:                   max(0, (N − n) / max(1, N − w))
    cosine:                   max(0, ½ (1 + cos(π · p)))                 p = (n − w) / max(1, N − w)
    cosine_with_restarts:     max(0, ½ (1 + cos(π · ((c · p) mod 1))))   c cycles; 0 once p ≥ 1

Loss, for x₀ latents, ε noise, t ~ U{t_min … t_max − 1}, ᾱ = alphas_cumprod[t]:
    x_t = √ᾱ · x₀ + √(1 − ᾱ) · ε            ε ← ε + c · N(0, 1)_(b, ch, 1, 1) with noise offset c
    target = ε (epsilon)  or  v = √ᾱ · ε − √(1 − ᾱ) · x₀ (v_prediction)
    loss_b = mean((pred − target)²) · w_b,  SNR = ᾱ / (1 − ᾱ)
    min-SNR-γ: w = min(SNR, γ) / SNR (ε)  or  min(SNR, γ) / (SNR + 1) (v); w = 1 without γ.
"""
from __future__ import annotations

import math

import torch

from ..errors import TrainingError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


def lr_factor(name: str, step: int, total: int, warmup: int = 0, cycles: int = 1) -> float:
    if name not in SCHEDULERS:
        raise TrainingError(f"unknown lr scheduler {name!r} (one of {', '.join(SCHEDULERS)})")
    if step < warmup:
        return step / max(1, warmup)
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    p = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - p)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    if p >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * p) % 1.0))))


def noisy_inputs(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for the formula above; fp32."""
    a = alphas_cumprod.to(latents.device)[t].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    return noisy, target


def loss_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    a = alphas_cumprod.to(t.device)[t].float()
    snr = a / (1 - a)
    if not gamma:
        return torch.ones_like(snr)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted MSE, averaged over the batch."""
    per = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))
    return (per * weights).mean()
