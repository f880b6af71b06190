"""Flux.1 / Chroma models for tests: tiny diffusers transformers from the diffusers test configs, the
real Flux.1-dev / Chroma trees on the meta device, and the native (BFL/ComfyUI) tree of any of them.

The native tree is not on PyPI; it is built here from the diffusers model through the family
declaration (``native_state``) and checked against diffusers' own single-file converter
(``convert_flux_transformer_checkpoint_to_diffusers``) in tests/families.
"""
from __future__ import annotations

import torch
from torch import nn

from lora_engine.families import BY_NAME

TINY_FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
# Flux.1-dev's transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])
TINY_CHROMA = dict(TINY_FLUX, approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1)
# Chroma1-HD's transformer/config.json
CHROMA = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=[16, 56, 56],
              approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)


def flux_model(config: dict = TINY_FLUX, seed: int = 0, meta: bool = False, chroma: bool = False):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    cls = ChromaTransformer2DModel if chroma else FluxTransformer2DModel
    if meta:
        with torch.device("meta"):
            return cls(**config)
    torch.manual_seed(seed)
    m = cls(**config)
    with torch.no_grad():  # diffusers zero-inits some layers: give every tensor distinct values
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return m.eval()


def native_state(model, family: str = "flux") -> dict[str, torch.Tensor]:
    """The native (BFL) state dict of a diffusers Flux/Chroma model, assembled by the declaration."""
    fam = BY_NAME[family]
    dstate = model.state_dict()
    dshapes = {k: tuple(v.shape) for k, v in dstate.items()}
    cfg = fam.config(dshapes, "diffusers")
    out: dict[str, torch.Tensor] = {}
    for layer in fam.layers(cfg):
        for param, dparam in ((layer.native_param, layer.diffusers_param), ("bias", "bias")):
            srcs = [f"{p.diffusers}.{dparam}" for p in layer.parts]
            if not all(s in dstate for s in srcs):
                continue
            height = sum((p.native_rows[1] - p.native_rows[0]) if p.native_rows else dstate[s].shape[0]
                         for p, s in zip(layer.parts, srcs))
            t = torch.empty((height, *dstate[srcs[0]].shape[1:]), dtype=dstate[srcs[0]].dtype, device=dstate[srcs[0]].device)
            for p, s in zip(layer.parts, srcs):
                src = dstate[s] if p.diffusers_rows is None else dstate[s][p.diffusers_rows[0]:p.diffusers_rows[1]]
                if p.native_rows is None:
                    t = src.clone()
                else:
                    t[p.native_rows[0]:p.native_rows[1]] = src
            out[f"{layer.native}.{param}"] = t
    return out


class NativeTree(nn.Module):
    """A module tree with the native names: every 2-D ``X.weight`` is an ``nn.Linear`` (with ``X.bias``
    when present), other tensors are parameters of plain modules. Enough to patch and to run each
    Linear; the model's own forward is not needed by the tests that use it."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for key, t in state.items():
            path, _, name = key.rpartition(".")
            parent = self._ensure(path, linear=(name in ("weight", "bias") and f"{path}.weight" in state
                                                and state[f"{path}.weight"].ndim == 2), state=state)
            if not isinstance(parent, nn.Linear):
                parent.register_parameter(name, nn.Parameter(t.clone(), requires_grad=False))
        with torch.no_grad():
            for key, t in state.items():
                path, _, name = key.rpartition(".")
                mod = self.get_submodule(path)
                if isinstance(mod, nn.Linear):
                    getattr(mod, name).copy_(t)
        self.requires_grad_(False)

    def _ensure(self, path: str, linear: bool, state) -> nn.Module:
        mod: nn.Module = self
        parts = path.split(".")
        for i, part in enumerate(parts):
            child = mod._modules.get(part)
            if child is None:
                if i == len(parts) - 1 and linear:
                    w = state[f"{path}.weight"]
                    child = nn.Linear(w.shape[1], w.shape[0], bias=f"{path}.bias" in state, device=w.device, dtype=w.dtype)
                else:
                    child = nn.Module()
                mod.add_module(part, child)
            mod = child
        return mod


# SD3 / SD3.5 (diffusers SD3Transformer2DModel): the diffusers test config, 3.5-Medium's variant of it,
# and the released configs (transformer/config.json of SD3.5-Large and SD3.5-Medium)
TINY_SD3 = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
                caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
                pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None)
TINY_SD35M = dict(TINY_SD3, dual_attention_layers=(0,), qk_norm="rms_norm")
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))


def sd3_model(config: dict = TINY_SD3, seed: int = 0, meta: bool = False):
    from diffusers import SD3Transformer2DModel

    if meta:
        with torch.device("meta"):
            return SD3Transformer2DModel(**config)
    torch.manual_seed(seed)
    m = SD3Transformer2DModel(**config)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return m.eval()
