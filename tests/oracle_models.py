"""Tiny real diffusers/transformers models for the format/adapter oracle tests."""
from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, linear_proj: bool = False, cross_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=8, use_linear_projection=linear_proj,
    ).eval()


def tiny_clip(seed: int = 0, hidden: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_dim=hidden)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def module_output(module: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor, bias=None) -> torch.Tensor:
    """Run a Linear/Conv2d layer with a replacement weight (and bias; default the layer's own), its stride, padding."""
    import torch.nn.functional as F

    if bias is None:
        bias = getattr(module, "bias", None)
    if isinstance(module, torch.nn.Conv2d):
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, torch.nn.Linear):
        return F.linear(x, weight, bias)
    raise TypeError(type(module))


def sample_input(module: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(module, torch.nn.Conv2d):
        return torch.randn(2, module.in_channels, 6, 6, generator=g)
    return torch.randn(3, module.in_features, generator=g)
