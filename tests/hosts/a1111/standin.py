"""A minimal stand-in for the parts of AUTOMATIC1111 1.10 the extension touches (A1111 itself cannot
be installed from a package registry). Each piece is typed after the real interface it replaces:

- ``ExtraNetworkParams``, ``parse_prompts``, ``activate``, ``deactivate``: ``modules/extra_networks.py``
  (tags ``<(\\w+):([^>]+)>`` cut from every prompt, only the first prompt's arguments returned;
  ``activate`` calls the mentioned networks, then every other registered one with ``[]``);
- ``Processing``: the ``StableDiffusionProcessing`` fields read or written (prompts per batch, the
  ``cached_c``/``cached_uc`` class caches keyed on prompts + first prompt's network data, ``comment``,
  ``extra_generation_params``, ``is_hr_pass``);
- ``SdConditioning``: ``prompt_parser.SdConditioning`` (a list of texts with ``is_negative_prompt``);
- ``CFGDenoiserParams``: ``script_callbacks.CFGDenoiserParams`` (``x`` = the denoiser batch: cond rows
  per image, then one uncond row per image);
- ``SDModel``: an ldm ``LatentDiffusion`` as A1111 holds it: ``model.diffusion_model`` (ldm names,
  ``forward(x, timesteps, context)``) and ``cond_stage_model`` (the hijack wrapper: ``.wrapped.transformer``
  is the HF CLIP, ``forward(texts)``), with ``get_learned_conditioning(texts)``.

``process_images`` runs the real call order of ``processing.process_images_inner`` for txt2img:
per batch, slice prompts -> parse tags -> extra-network ``activate`` -> uc, c (cached) -> per step the
cfg-denoiser callback, then the UNet on the denoiser batch -> CFG; at the end ``deactivate``.
The sampler is a toy Euler-like update: the point is the call sequence, not image quality.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from tests.fixtures.models.hosts import nested_clip
from tests.fixtures.models.ldm_view import ldm_unet_view

RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional, self.named = [], {}
        for item in self.items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


def parse_prompts(prompts):
    res, first = [], None
    for prompt in prompts:
        data = defaultdict(list)

        def found(m, data=data):
            data[m.group(1)].append(ExtraNetworkParams(m.group(2).split(":")))
            return ""

        res.append(RE_EXTRA_NET.sub(found, prompt))
        if first is None:
            first = data
    return res, first


def _lookup(registry, aliases, data):
    res = {}
    for name, args in data.items():
        net = registry.get(name) or aliases.get(name)
        if net is not None:
            res.setdefault(net, []).extend(args)
    return res


def activate(p, data, registry, aliases):
    done = []
    for net, args in _lookup(registry, aliases, data).items():
        net.activate(p, args)
        done.append(net)
    for net in registry.values():
        if net not in done:
            net.activate(p, [])


def deactivate(p, data, registry, aliases):
    for net in set(registry.values()):
        net.deactivate(p)


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False):
        super().__init__(prompts)
        self.is_negative_prompt = is_negative_prompt


@dataclass
class CFGDenoiserParams:
    x: torch.Tensor
    image_cond: torch.Tensor | None
    sigma: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    text_cond: torch.Tensor
    text_uncond: torch.Tensor
    denoiser: object = None


@dataclass
class Opts:
    """``shared.opts``: attributes; missing ones read as None (A1111 raises; our reader has defaults)."""

    values: dict = field(default_factory=dict)

    def __getattr__(self, key):
        if key == "values":
            raise AttributeError(key)
        return self.values.get(key)


class Processing:
    cached_c = [None, None]
    cached_uc = [None, None]

    def __init__(self, sd_model, prompts, negative_prompts, batch_size, steps=4, hr_prompts=None):
        self.sd_model = sd_model
        self.all_prompts = list(prompts)
        self.all_negative_prompts = list(negative_prompts)
        self.all_hr_prompts = list(hr_prompts) if hr_prompts else None
        self.all_hr_negative_prompts = list(negative_prompts) if hr_prompts else None
        self.batch_size = batch_size
        self.n_iter = len(prompts) // batch_size
        self.iteration = 0
        self.steps = steps
        self.prompts = self.negative_prompts = None
        self.hr_prompts = self.hr_negative_prompts = None
        self.extra_generation_params = {}
        self.comments = {}
        self.is_hr_pass = False
        self.disable_extra_networks = False

    def comment(self, text):
        self.comments[text] = 1

    def get_conds_with_caching(self, texts, cache, data):
        key = (list(texts), data)
        if cache[0] is not None and cache[0] == key:
            return cache[1]
        cache[1] = get_learned_conditioning(self.sd_model, texts)
        cache[0] = key
        return cache[1]


def get_learned_conditioning(model, prompts):
    """``prompt_parser.get_learned_conditioning`` without schedules: one model call per distinct prompt,
    each with an ``SdConditioning`` that keeps ``is_negative_prompt``."""
    done = {}
    for prompt in prompts:
        if prompt not in done:
            texts = SdConditioning([prompt], getattr(prompts, "is_negative_prompt", False))
            done[prompt] = model.get_learned_conditioning(texts)[0]
    return torch.stack([done[prompt] for prompt in prompts])


def tokenize(texts, n_ctx: int, vocab: int) -> torch.Tensor:
    """One token per character, after the whitespace clean-up both of A1111's tokenizers do first
    (CLIP's and OpenCLIP's ``whitespace_clean``: runs of whitespace -> one space, stripped)."""
    out = torch.ones(len(texts), n_ctx, dtype=torch.long)
    for i, t in enumerate(texts):
        t = " ".join(t.split())
        ids = [0] + [2 + (ord(ch) % (vocab - 2)) for ch in t][: n_ctx - 2] + [1]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class HijackedCLIP(nn.Module):
    """``FrozenCLIPEmbedderWithCustomWords``: ``.wrapped.transformer`` is the HF CLIP; ``forward(texts)``."""

    def __init__(self, clip):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = nested_clip(clip)
        self._clip = [clip]

    def forward(self, texts):
        c = self._clip[0]
        tokens = tokenize(texts, c.config.max_position_embeddings, c.config.vocab_size)
        return c(input_ids=tokens).last_hidden_state


class LdmUNet(nn.Module):
    """ldm ``UNetModel`` names over a diffusers UNet's own layers; ``forward(x, timesteps, context)``."""

    def __init__(self, unet):
        super().__init__()
        for name, child in ldm_unet_view(unet).named_children():
            self.add_module(name, child)
        self._unet = [unet]

    def forward(self, x, timesteps=None, context=None):
        return self._unet[0](x, timesteps, encoder_hidden_states=context).sample


class SDModel(nn.Module):
    def __init__(self, tiny):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = LdmUNet(tiny.unet)
        self.cond_stage_model = HijackedCLIP(tiny.text_encoders[0])

    def get_learned_conditioning(self, texts):
        return self.cond_stage_model(texts)


def cfg_step(sd_model, x, c, uc, step, total, callbacks, cfg_scale=5.0):
    """One ``CFGDenoiser.forward`` (no AND): rows = cond per image, then uncond per image."""
    x_in = torch.cat([x, x])
    sigma = torch.full((x_in.shape[0],), float(total - step))
    params = CFGDenoiserParams(x_in, None, sigma, step, total, c, uc)
    for cb in callbacks:
        cb(params)
    out = sd_model.model.diffusion_model(params.x, params.sigma, torch.cat([c, uc]))
    cond, uncond = out[: x.shape[0]], out[x.shape[0]:]
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def process_images(p, registry, aliases=None, callbacks=(), seed=0, hires_steps=0, latent=8):
    """``process_images_inner`` (txt2img) for each batch; returns the final latents of every image."""
    aliases = aliases or {}
    results = []
    data = {}
    for n in range(p.n_iter):
        p.iteration = n
        sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts, p.negative_prompts = p.all_prompts[sl], p.all_negative_prompts[sl]
        p.prompts, data = parse_prompts(p.prompts)
        if p.all_hr_prompts:
            p.hr_prompts, hr_data = parse_prompts(p.all_hr_prompts[sl])
            p.hr_negative_prompts = p.all_hr_negative_prompts[sl]
        p.is_hr_pass = False
        activate(p, data, registry, aliases)
        uc = p.get_conds_with_caching(SdConditioning(p.negative_prompts, True), Processing.cached_uc, data)
        c = p.get_conds_with_caching(SdConditioning(p.prompts), Processing.cached_c, data)
        x = torch.cat([torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(seed + n * p.batch_size + i))
                       for i in range(len(p.prompts))])
        for step in range(p.steps):
            x = x - 0.05 * cfg_step(p.sd_model, x, c, uc, step, p.steps, callbacks)
        if hires_steps:
            p.is_hr_pass = True
            activate(p, hr_data, registry, aliases)
            uc = get_learned_conditioning(p.sd_model, SdConditioning(p.hr_negative_prompts, True))
            c = get_learned_conditioning(p.sd_model, SdConditioning(p.hr_prompts))
            for step in range(hires_steps):
                x = x - 0.05 * cfg_step(p.sd_model, x, c, uc, step, hires_steps, callbacks)
        results.append(x)
    deactivate(p, data, registry, aliases)
    return torch.cat(results)
