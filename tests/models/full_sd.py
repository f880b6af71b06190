"""Full-size SD1.5, SD2.x and SDXL-base configurations (public model-card values).

``build_full(arch, device="meta")`` builds the real module trees without memory, for structure
tests (key maps over 4 levels, SDXL transformer depth 10, 23/24/32-layer encoders); benchmarks can
build them on ``"cpu"`` for real tensors. The SD2 text encoder is OpenCLIP-H as diffusers ships it
(23 of its 24 layers); ``a1111_root`` converts it to the fused 23-layer tower.
"""
from __future__ import annotations

import torch

from .tiny_sd import TinySD

_SD1_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                   block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
UNET = {
    "sd1": dict(_SD1_BLOCKS, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(_SD1_BLOCKS, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
_TOKENS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_L = dict(_TOKENS, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H = dict(_TOKENS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)
OPENCLIP_G = dict(_TOKENS, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
TEXT_ENCODERS = {"sd1": (CLIP_L,), "sd2": (OPENCLIP_H,), "sdxl": (CLIP_L, OPENCLIP_G)}


def build_full(arch: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> TinySD:
    """The real-size model of a family (random weights on a real device; no storage on "meta")."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel(**UNET[arch]).eval()
        tes = []
        for i, cfg in enumerate(TEXT_ENCODERS[arch]):
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            tes.append(cls(CLIPTextConfig(**cfg)).eval())
    if torch.device(device).type != "meta":
        for i, part in enumerate([unet, *tes]):
            randomize_norms(part, seed=100 + i)
    if dtype != torch.float32:
        unet, tes = unet.to(dtype), [te.to(dtype) for te in tes]
    return TinySD(arch, unet, tes)


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every LayerNorm/GroupNorm a seeded weight 1 + 0.1·N(0,1) and bias 0.1·N(0,1), as a trained model
    has, instead of the libraries' init (weight 1, bias 0). With the init, CLIP's ``final_layer_norm``
    output has a mean of exactly 0 over each token's features, and A1111's emphasis step
    (``original_mean / new_mean``) divides 0 by 0: the host itself then makes NaN for any prompt."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
