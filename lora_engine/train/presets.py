"""Starting points people actually use: the defaults of hollowstrawberry/kohya-colab (``Lora_Trainer.ipynb``,
``Lora_Trainer_XL.ipynb``): SD1.5 rank 16 / α 8, UNet LR 5e-4, TE LR 1e-4, batch 3; SDXL rank 8 / α 4,
3e-4 / 6e-5, batch 4; styles add LoCon convs 8/1 (SD1.5) or use rank 16 / α 8 with convs 16/8 (SDXL);
cosine with 3 restarts; shuffled captions keeping the first tag; min-SNR γ 5 (SD1.5) / 8 (SDXL). These sit
within the ranges of sd-scripts' docs and bmaltais/kohya_ss's ``presets/lora/*.json``. A preset is a plain
settings dict for ``build_config``; user settings go on top: ``build_config(PRESETS[name] | mine)``.

Character presets train the text encoder on SD1.5 (characters benefit) but not on SDXL (sd-scripts'
SDXL docs recommend UNet-only); style presets add LoCon convs and flip augmentation.
"""
from __future__ import annotations

from ..errors import TrainingError

_COMMON = dict(optimizer="adamw", weight_decay=0.1, scheduler="cosine_with_restarts", num_cycles=3,
               shuffle=True, keep_tokens=1, max_grad_norm=1.0)

PRESETS: dict[str, dict] = {
    "sd15_character": _COMMON | dict(resolution=512, rank=16, alpha=8, unet_lr=5e-4, te_lr=1e-4,
                                     train_text_encoder=True, batch_size=3, min_snr_gamma=5.0),
    "sd15_style": _COMMON | dict(resolution=512, rank=16, alpha=8, conv_rank=8, conv_alpha=1, unet_lr=5e-4,
                                 te_lr=1e-4, train_text_encoder=False, batch_size=3, flip=True, min_snr_gamma=5.0,
                                 noise_offset=0.05),
    "sdxl_character": _COMMON | dict(resolution=1024, rank=8, alpha=4, unet_lr=3e-4, te_lr=6e-5,
                                     train_text_encoder=False, batch_size=4, min_snr_gamma=8.0,
                                     gradient_checkpointing=True, mixed_precision="bf16"),
    "sdxl_style": _COMMON | dict(resolution=1024, rank=16, alpha=8, conv_rank=16, conv_alpha=8, unet_lr=3e-4,
                                 te_lr=6e-5, train_text_encoder=False, batch_size=4, flip=True, min_snr_gamma=8.0,
                                 gradient_checkpointing=True, mixed_precision="bf16", noise_offset=0.0357),
}


def preset(name: str) -> dict:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise TrainingError(f"unknown preset {name!r} (one of {', '.join(PRESETS)})") from None
