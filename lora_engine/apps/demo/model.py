"""The demo text-to-image model: the real SD1 parts at toy size, in pixel space.

- ``unet``: diffusers ``UNet2DConditionModel`` with the SD1 block layout (ResNet blocks, self- and
  cross-attention transformer blocks in all levels but the lowest, time embedding). Its "latent"
  is the image itself, pixel-unshuffled: 32x32x3 pixels are seen as 16x16x12 (lossless and
  exactly invertible, so there is no VAE to train; it cuts the UNet's cost 4x, which matters on
  a CPU). It predicts v (as SD2 does), which gives clean samples after far fewer training steps
  than epsilon on this cosine schedule;
- ``text_encoder``: transformers ``CLIPTextModel`` (causal transformer, last hidden state as
  the cross-attention context) over :class:`~lora_engine.apps.demo.tokenizer.DemoTokenizer` ids.

:class:`DemoModel` is the container the key map reads: its children are named ``unet`` and
``text_encoder`` as in a diffusers pipeline, so ``build_keymap(shapes_of(model))`` finds both.
Weights live in one safetensors file (fp16 on disk, fp32 in memory) with the configs and the
vocabulary in its metadata, checked on load.
"""
from __future__ import annotations

import json
import os

import torch

from ...errors import LoraFileError
from .tokenizer import VOCAB, DemoTokenizer

RESOLUTION = 32  # pixels per side
PATCH = 2  # pixel (un)shuffle factor: the UNet sees (3·PATCH², RESOLUTION/PATCH, RESOLUTION/PATCH)
UNET_CONFIG = dict(
    sample_size=RESOLUTION // PATCH, in_channels=3 * PATCH * PATCH, out_channels=3 * PATCH * PATCH,
    layers_per_block=1, norm_num_groups=8, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4,
)
TEXT_CONFIG = dict(
    vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=8, hidden_act="quick_gelu", projection_dim=64,
    bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                        clip_sample=True)
FORMAT = "lora-engine-demo-base/1"


class DemoModel(torch.nn.Module):
    """``unet`` + ``text_encoder`` + the tokenizer; ``encode`` turns prompts into the context."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: DemoTokenizer):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``(B, max_length, hidden)`` context: the text encoder's last hidden state."""
        ids = self.tokenizer(prompts).to(self.unet.device)
        return self.text_encoder(input_ids=ids).last_hidden_state

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Noise prediction for pixel images ``x`` (B, 3, H, W) at timesteps ``t``."""
        z = torch.nn.functional.pixel_unshuffle(x, PATCH)
        return torch.nn.functional.pixel_shuffle(self.unet(z, t, encoder_hidden_states=context).sample, PATCH)


def build_model(seed: int = 0) -> DemoModel:
    """A freshly initialised model (deterministic for a seed)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return DemoModel(unet, text_encoder, DemoTokenizer()).eval()


def save_model(model: DemoModel, path: str | os.PathLike, info: dict | None = None) -> None:
    """Write the weights as fp16 safetensors (atomically: a temp file then rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "unet_config": json.dumps(UNET_CONFIG), "text_config": json.dumps(TEXT_CONFIG),
            "vocab": json.dumps(list(model.tokenizer.vocab)), "info": json.dumps(info or {})}
    tmp = f"{os.fspath(path)}.partial"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_model(path: str | os.PathLike) -> DemoModel:
    """Build the architecture and load the weights; one clear error if the file does not fit."""
    from ...formats.safetensors_file import SafetensorsFile

    sf = SafetensorsFile(path)
    meta = sf.metadata or {}
    if meta.get("format") != FORMAT:
        raise LoraFileError(path, f"not a demo base model (format {meta.get('format')!r}, expected {FORMAT!r})")
    if json.loads(meta.get("vocab", "[]")) != list(VOCAB):
        raise LoraFileError(path, "demo base model was trained with another vocabulary")
    model = build_model()
    state = model.state_dict()
    missing = sorted(set(state) - set(sf.keys()))
    if missing:
        raise LoraFileError(path, f"demo base model lacks {len(missing)} tensors (e.g. {missing[0]})")
    with torch.no_grad():
        for k, v in state.items():
            t = sf.get(k)
            if tuple(t.shape) != tuple(v.shape):
                raise LoraFileError(path, f"{k}: shape {list(t.shape)}, model has {list(v.shape)}")
            v.copy_(t.to(v.dtype))
    return model.eval()
