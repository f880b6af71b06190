"""ldm/sgm-named views of a diffusers ``UNet2DConditionModel`` whose leaves ARE its modules.

The view is an ``nn.Module`` tree with the real ldm/sgm paths (``time_embed.0``,
``input_blocks.{i}.{0,1}``, ``…0.op``, ``middle_block.{k}``, ``output_blocks.{i}.{0,1,2}``,
``…in_layers.2``, ``…emb_layers.1``, ``…out_layers.3``, ``…skip_connection``, ``out.2``,
``label_emb.0.0``) built by walking the diffusers object tree. Its leaf modules are shared
objects, so writing a weight through an ldm name changes the diffusers model, which can then
run forward. The tests check the view against diffusers' own ldm->diffusers converter.
"""
from __future__ import annotations

from torch import nn


class ResBlockView(nn.Module):
    """ldm ``ResBlock`` layout around a diffusers ``ResnetBlock2D``'s layers."""

    def __init__(self, r):
        super().__init__()
        self.in_layers = nn.Sequential(r.norm1, nn.SiLU(), r.conv1)
        self.emb_layers = nn.Sequential(nn.SiLU(), r.time_emb_proj)
        self.out_layers = nn.Sequential(r.norm2, nn.SiLU(), nn.Dropout(0.0), r.conv2)
        self.skip_connection = r.conv_shortcut if r.conv_shortcut is not None else nn.Identity()


class DownsampleView(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.op = d.conv


class UpsampleView(nn.Module):
    def __init__(self, u):
        super().__init__()
        self.conv = u.conv


def _attentions(block) -> list:
    return list(getattr(block, "attentions", None) or [])


def _input_blocks(unet) -> nn.ModuleList:
    blocks = [nn.ModuleList([unet.conv_in])]
    for down in unet.down_blocks:
        attns = _attentions(down)
        for j, r in enumerate(down.resnets):
            blocks.append(nn.ModuleList([ResBlockView(r)] + ([attns[j]] if j < len(attns) else [])))
        if down.downsamplers:
            blocks.append(nn.ModuleList([DownsampleView(down.downsamplers[0])]))
    return nn.ModuleList(blocks)


def _middle_block(mid) -> nn.ModuleList:
    seq = []
    attns = _attentions(mid)
    for j, r in enumerate(mid.resnets):
        seq.append(ResBlockView(r))
        if j < len(attns):
            seq.append(attns[j])
    return nn.ModuleList(seq)


def _output_blocks(unet) -> nn.ModuleList:
    blocks = []
    for up in unet.up_blocks:
        attns = _attentions(up)
        for j, r in enumerate(up.resnets):
            mods = [ResBlockView(r)] + ([attns[j]] if j < len(attns) else [])
            if j == len(up.resnets) - 1 and up.upsamplers:
                mods.append(UpsampleView(up.upsamplers[0]))
            blocks.append(nn.ModuleList(mods))
    return nn.ModuleList(blocks)


def ldm_unet_view(unet) -> nn.Module:
    """The ``diffusion_model`` of an ldm/sgm checkpoint, sharing ``unet``'s layers."""
    v = nn.Module()
    te = unet.time_embedding
    v.time_embed = nn.Sequential(te.linear_1, nn.SiLU(), te.linear_2)
    if getattr(unet, "add_embedding", None) is not None:
        ae = unet.add_embedding
        v.label_emb = nn.Sequential(nn.Sequential(ae.linear_1, nn.SiLU(), ae.linear_2))
    v.input_blocks = _input_blocks(unet)
    v.middle_block = _middle_block(unet.mid_block)
    v.output_blocks = _output_blocks(unet)
    v.out = nn.Sequential(unet.conv_norm_out, nn.SiLU(), unet.conv_out)
    return v
