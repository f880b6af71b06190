"""Trainable LoRA modules attached to a host model by forward hooks (weights and names untouched).

For a target Linear / Conv2d ``W`` (sd-scripts ``networks/lora.py``, ``LoRAModule``)::

    y = W x + s · up(drop(down(x)))            s = α / r
    Linear:   down (r, i),        up (o, r)
    Conv k×k: down (r, i, k, k) with W's stride/padding/dilation, up (o, r, 1, 1)

Dropout variants, training only: ``dropout`` p is inverted dropout on ``down(x)``;
``rank_dropout`` p zeroes whole rank channels per sample and scales by 1/(1-p);
``module_dropout`` p skips the whole side path for that forward. ``up`` starts at zero and
``down`` Kaiming-uniform(a=√5), as in sd-scripts, so the untrained network is the identity.

The saved tensors (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) are what
``lora_engine.adapters.lora.LoRA`` reads back, so the engine applies exactly what was trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import TrainingError

# Class names (diffusers / ldm / transformers / open_clip) that decide what is trained.
TRANSFORMER_BLOCKS = ("Transformer2DModel", "SpatialTransformer")
RESNET_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample")
TE_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP", "ResidualAttentionBlock")
ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class NetworkConfig:
    """What to train. ``unet_targets``: ``"transformer"`` (kohya default: every Linear/1×1 conv in
    the transformer blocks), ``"attention"`` (to_q/k/v/out only, like diffusers' LoRA example) or
    ``"all"`` (every Linear/1×1 conv of the UNet). ``conv_rank`` adds the k×k convs of ResNet and
    resampling blocks (LoCon). ``train_unet``/``train_text_encoder`` switch whole components."""

    rank: int = 16
    alpha: float = 8.0
    conv_rank: int = 0
    conv_alpha: float = 1.0
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    unet_targets: str = "transformer"
    train_unet: bool = True
    train_text_encoder: bool = False


class LoraHook(torch.nn.Module):
    """One trainable LoRA; ``attach(base)`` registers the forward hook adding its side path."""

    def __init__(self, name: str, base: torch.nn.Module, rank: int, alpha: float, cfg: NetworkConfig):
        super().__init__()
        self.lora_name = name
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.dropout, self.rank_dropout, self.module_dropout = cfg.dropout, cfg.rank_dropout, cfg.module_dropout
        w = base.weight
        if isinstance(base, torch.nn.Conv2d):
            self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
            down = torch.empty(rank, base.in_channels, *base.kernel_size)
            up = torch.zeros(base.out_channels, rank, 1, 1)
        else:
            self.conv = None
            down = torch.empty(rank, base.in_features)
            up = torch.zeros(base.out_features, rank)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.down = torch.nn.Parameter(down.to(w.device))
        self.up = torch.nn.Parameter(up.to(w.device))
        self._handle = None
        self._base_ref = [base]  # a list keeps the host module out of this module's children

    def side(self, x: torch.Tensor) -> torch.Tensor:
        """``s · up(drop(down(x)))`` in the input's dtype (autocast decides the matmul dtype)."""
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv is None:
            h = F.linear(x, down)
        else:
            h = F.conv2d(x, down, None, **self.conv)
        scale = self.scale
        if self.training:
            if self.dropout > 0:
                h = F.dropout(h, p=self.dropout)
            if self.rank_dropout > 0:
                shape = (h.shape[0], self.rank) + (1,) * (h.ndim - 2) if self.conv else \
                    (h.shape[0],) + (1,) * (h.ndim - 2) + (self.rank,)
                mask = (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
                h = h * mask
                scale = scale / (1.0 - self.rank_dropout)
        h = F.linear(h, up) if self.conv is None else F.conv2d(h, up)
        return h * scale

    def _hook(self, module, args, out):
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return out
        return out + self.side(args[0]).to(out.dtype)

    def attach(self) -> None:
        if self._handle is None:
            self._handle = self._base_ref[0].register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        n = self.lora_name
        return {f"{n}.lora_down.weight": self.down.detach(), f"{n}.lora_up.weight": self.up.detach(),
                f"{n}.alpha": torch.tensor(self.alpha)}


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _canonical_name(names: list[str], component: str, keymap) -> str:
    """kohya's own spelling: diffusers block names for SD1/SD2, sgm names for SDXL (UNet);
    ``text_model`` paths for CLIP. ``names`` lists the host-naming name first."""
    if component == "te":
        return next((n for n in names if "_text_model_" in n), names[0])
    want_ldm = keymap.family is not None and keymap.family.kohya_naming == "ldm"
    host_is_ldm = keymap.unet_naming == "ldm"
    if want_ldm == host_is_ldm or len(names) < 2:
        return names[0]
    return names[1]


def _kind(path: str, names: list[str], classes: dict[str, str]) -> str:
    """Block kind of a UNet module: ``"transformer"``, ``"resnet"`` (ResNet / down- / upsampler) or
    ``"other"``. Read from its diffusers-naming kohya name (every host's key map lists one), so ldm,
    sgm and ComfyUI layouts classify like diffusers; ancestor class names are the fallback."""
    dname = next((n for n in names if n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_",
                                                     "lora_unet_up_blocks_"))), None)
    if dname is not None:
        if "_attentions_" in dname:
            return "transformer"
        return "resnet" if any(k in dname for k in ("_resnets_", "_downsamplers_", "_upsamplers_")) else "other"
    up = {classes.get(a, "") for a in _ancestors(path)}
    if up & set(TRANSFORMER_BLOCKS):
        return "transformer"
    return "resnet" if up & set(RESNET_BLOCKS) else "other"


def _selected(path: str, module, names: list[str], component: str, cfg: NetworkConfig,
              classes: dict[str, str]) -> int | None:
    """Rank to use for this module, or None when it is not trained. sd-scripts' rules (``networks/lora.py``
    ``create_modules``): Linear / 1×1 conv children of the targeted blocks get ``rank``, k×k convs of ResNet
    and resampling blocks ``conv_rank`` (only when it is set); text encoders: attention and MLP Linears."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return None
    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        return None
    parents = _ancestors(path)
    if parents and classes.get(parents[-1]) == "MultiheadAttention":
        return None  # MHA reads out_proj.weight directly: a forward hook on it would never run
    kxk = isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
    if component == "te":
        in_block = {classes.get(a, "") for a in parents} & set(TE_BLOCKS) or \
            any(("_self_attn_" in n or "_mlp_" in n) for n in names)
        return cfg.rank if cfg.train_text_encoder and not kxk and in_block else None
    if not cfg.train_unet:
        return None
    kind = _kind(path, names, classes)
    if kind == "resnet" and cfg.conv_rank > 0:
        return cfg.conv_rank if kxk else cfg.rank
    if kxk:
        return None
    if cfg.unet_targets == "all":
        return cfg.rank
    if cfg.unet_targets == "attention":
        return cfg.rank if kind == "transformer" and path.endswith(ATTENTION_LEAVES) else None
    if cfg.unet_targets == "transformer":
        return cfg.rank if kind == "transformer" else None
    raise TrainingError(f"unknown unet_targets {cfg.unet_targets!r} (transformer, attention or all)")


class TrainNetwork(torch.nn.Module):
    """All trainable LoRAs of one host root, named with the engine's key map."""

    def __init__(self, root: torch.nn.Module, keymap, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        by_target: dict = {}
        for name in keymap.names():
            by_target.setdefault(keymap.lookup(name), []).append(name)
        modules = dict(root.named_modules())
        classes = {p: type(m).__name__ for p, m in modules.items()}
        loras = []
        for target, names in by_target.items():
            if target.rows is not None:
                continue
            path = target.weight_key.rpartition(".")[0]
            rank = _selected(path, modules.get(path), names, target.component, cfg, classes)
            if rank is None:
                continue
            kxk = isinstance(modules[path], torch.nn.Conv2d) and tuple(modules[path].kernel_size) != (1, 1)
            alpha = cfg.conv_alpha if kxk else cfg.alpha
            loras.append(LoraHook(_canonical_name(names, target.component, keymap), modules[path], rank, alpha, cfg))
        if not loras:
            raise TrainingError("no module of this model matches the training targets "
                                f"(architecture {keymap.architecture}, unet_targets={cfg.unet_targets!r})")
        self.loras = torch.nn.ModuleList(loras)
        self.components = {lo.lora_name: ("te" if lo.lora_name.startswith("lora_te") else "unet") for lo in loras}

    def attach(self) -> None:
        for lo in self.loras:
            lo.attach()

    def detach(self) -> None:
        for lo in self.loras:
            lo.detach()

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict]:
        groups = []
        for comp, lr in (("unet", unet_lr), ("te", te_lr)):
            params = [p for lo in self.loras if self.components[lo.lora_name] == comp for p in (lo.down, lo.up)]
            if params:
                groups.append({"params": params, "lr": lr, "name": comp})
        return groups

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for lo in self.loras:
            for k, v in lo.kohya_tensors().items():
                out[k] = v.to("cpu", dtype).contiguous()
        return out
