"""Writing the trained LoRA: kohya tensors, ``ss_*`` metadata, hashes, atomic replace.

``sshs_model_hash`` = sha256 of the tensor-data region (every byte after the header) and
``sshs_legacy_hash`` = first 8 hex of sha256 of bytes [0x100000, 0x110000), both of the
serialisation with only the ``ss_*`` metadata (sd-scripts ``precalculate_safetensors_hashes``). The data
region does not depend on the metadata, so the values equal ``lora_engine.library.hashes.hash_file``'s
``addnet`` / ``legacy`` for the written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import torch
from safetensors.torch import save as st_save

from .captions import tag_frequency

DTYPES = {"fp32": torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARCH = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512", "sd_v2_768_v": "stable-diffusion-v2-768-v",
        "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temp file beside ``path``, fsync, then rename over it (never a half file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _hashes(blob: bytes) -> tuple[str, str]:
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest(), hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def save_lora(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Write the file; returns the metadata written (with the two hashes)."""
    meta = {k: str(v) for k, v in metadata.items()}
    addnet, legacy = _hashes(st_save(tensors, metadata=meta))
    meta = meta | {"sshs_model_hash": addnet, "sshs_legacy_hash": legacy}
    atomic_write(path, st_save(tensors, metadata=meta))
    return meta


def training_metadata(cfg, network, dataset, host, step: int, total_steps: int, epoch: float,
                      started_at: float, session_id: str) -> dict[str, str]:
    """sd-scripts' ``ss_*`` keys (strings; JSON packed as strings) plus the modelspec block."""
    n, d, rep = cfg.network, cfg.dataset, dataset.report
    args = {"conv_dim": n.conv_rank, "conv_alpha": n.conv_alpha, "rank_dropout": n.rank_dropout,
            "module_dropout": n.module_dropout, "unet_targets": n.unet_targets} if n.conv_rank else \
        {"rank_dropout": n.rank_dropout, "module_dropout": n.module_dropout, "unet_targets": n.unet_targets}
    name = cfg.output_name or os.path.splitext(os.path.basename(cfg.output))[0]
    bucket_info = {"buckets": {str(i): {"resolution": list(b), "count": c}
                               for i, (b, c) in enumerate(sorted(rep.buckets.items()))}}
    v = host.base_model_version
    meta = {
        "ss_session_id": session_id, "ss_training_started_at": started_at, "ss_training_finished_at": time.time(),
        "ss_output_name": name, "ss_training_comment": cfg.comment, "ss_seed": cfg.seed,
        "ss_steps": step, "ss_max_train_steps": total_steps, "ss_epoch": int(epoch),
        "ss_num_epochs": max(1, round(total_steps * cfg.grad_accum / max(1, dataset.batches_per_epoch))),
        "ss_num_batches_per_epoch": dataset.batches_per_epoch, "ss_gradient_accumulation_steps": cfg.grad_accum,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_network_module": "networks.lora", "ss_network_dim": n.rank, "ss_network_alpha": n.alpha,
        "ss_network_dropout": n.dropout, "ss_network_args": json.dumps(args),
        "ss_learning_rate": cfg.unet_lr, "ss_unet_lr": cfg.unet_lr if n.train_unet else 0,
        "ss_text_encoder_lr": cfg.te_lr if n.train_text_encoder else 0,
        "ss_optimizer": f"{cfg.optimizer}({json.dumps(cfg.optimizer_args)})", "ss_lr_scheduler": cfg.scheduler,
        "ss_lr_warmup_steps": cfg.warmup_steps, "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_mixed_precision": cfg.mixed_precision, "ss_base_model_version": v, "ss_v2": str(v.startswith("sd_v2")),
        "ss_sd_model_name": host.model_name, "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma, "ss_caption_dropout_rate": d.captions.dropout,
        "ss_caption_dropout_every_n_epochs": d.captions.dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": d.captions.tag_dropout, "ss_keep_tokens": d.captions.keep_tokens,
        "ss_shuffle_caption": d.captions.shuffle, "ss_flip_aug": d.flip, "ss_num_train_images": rep.samples,
        "ss_num_reg_images": 0, "ss_tag_frequency": json.dumps(tag_frequency(dataset.captions_by_folder())),
        "ss_dataset_dirs": json.dumps(rep.folders), "ss_batch_size_per_device": d.batch_size,
        "ss_total_batch_size": d.batch_size * cfg.grad_accum, "ss_resolution": f"({d.resolution}, {d.resolution})",
        "ss_enable_bucket": d.enable_buckets, "ss_bucket_no_upscale": not d.allow_upscale,
        "ss_bucket_info": json.dumps(bucket_info), "ss_prediction_type": host.prediction_type,
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": ARCH.get(v, v) + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if "xl" in v else "diffusers",
        "modelspec.title": name, "modelspec.resolution": f"{d.resolution}x{d.resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
        "modelspec.prediction_type": "v" if host.prediction_type == "v_prediction" else "epsilon",
    }
    return {k: str(val) for k, val in meta.items()}
