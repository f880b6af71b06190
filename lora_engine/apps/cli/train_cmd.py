"""``lora-engine train [CONFIG.toml] --base FOLDER --data DIR --output FILE ...``

Settings come from the TOML file (flat keys or [network]/[dataset]/[captions] tables, plus
``base``/``device``/``tokenizer``/``prediction_type``), then the flags override them. The base is a
diffusers folder, a single-file SD1/SD2/SDXL .safetensors checkpoint, or ``demo`` (the built-in demo model the
web UI trains on). Shows the dataset report, then a progress bar with loss and ETA. Ctrl-C stops after the
current step and writes the LoRA and its resume state (``--resume OUTPUT.trainstate`` continues exactly;
exit status 130); a second Ctrl-C stops at once. An existing OUTPUT is replaced only with ``--overwrite``
(or ``--resume``).
"""
from __future__ import annotations

import contextlib
import signal
import sys

from .tool_common import add_overwrite, add_threads, claim_output

# flag dest -> TrainConfig setting
FLAGS = {"data": "data_dir", "output": "output", "steps": "steps", "epochs": "epochs", "rank": "rank",
         "alpha": "alpha", "resolution": "resolution", "batch_size": "batch_size", "lr": "unet_lr",
         "te_lr": "te_lr", "save_every": "save_every_steps", "mixed_precision": "mixed_precision", "seed": "seed",
         "optimizer": "optimizer", "train_text_encoder": "train_text_encoder",
         "sample_every": "sample_every_steps", "sample_prompt": "sample_prompts"}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a LoRA on a diffusers model folder or a single-file checkpoint",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("config", nargs="?", help="TOML file with training settings")
    p.add_argument("--preset", help="start from a preset: sd15_character, sd15_style, sdxl_character, sdxl_style "
                   "(the file and the flags override it)")
    p.add_argument("--base", help="diffusers model folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/), a "
                   "single-file SD1/SD2/SDXL .safetensors checkpoint (A1111/ComfyUI layout), or 'demo' (the built-in "
                   "demo model, 32x32 pixels) or a demo base file")
    p.add_argument("--tokenizer", help="single-file base: a CLIP tokenizer folder (or a diffusers folder with "
                   "tokenizer/ and tokenizer_2/); default: the offline HF cache, then open_clip's BPE table")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), dest="prediction_type",
                   help="single-file base: what the model predicts (default: the <checkpoint>.yaml beside it, "
                   "else epsilon; SD2.x 768-v models need v_prediction)")
    p.add_argument("--data", help="image folder (captions in .txt/.caption; N_name subfolders repeat N times)")
    p.add_argument("--output", help="output .safetensors file")
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float, help="UNet learning rate")
    p.add_argument("--te-lr", type=float, dest="te_lr", help="text-encoder learning rate")
    p.add_argument("--train-text-encoder", action="store_true", default=None, dest="train_text_encoder")
    p.add_argument("--optimizer")
    p.add_argument("--save-every", type=int, dest="save_every", help="save every N steps")
    p.add_argument("--sample-every", type=int, dest="sample_every", help="render preview images every N steps")
    p.add_argument("--sample-prompt", action="append", dest="sample_prompt",
                   help="a preview prompt (repeat the flag for several); images go to OUTPUT-samples/")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), dest="mixed_precision")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resume", help="a .trainstate file written by an earlier run with the same settings")
    p.add_argument("--dry-run", action="store_true", help="validate the dataset and print the report only")
    add_overwrite(p)
    add_threads(p, small_model=_uses_demo)
    p.set_defaults(func=run, cancelled="files saved before (periodic saves) are complete")


def _uses_demo(args) -> bool:
    from ..demo.base import is_demo_base

    return is_demo_base(_settings(args)[1])


def _settings(args) -> tuple[dict, str | None, str | None, dict]:
    from ...train import load_toml
    from ...train.presets import preset

    settings = load_toml(args.config) if args.config else {}
    name = args.preset or settings.pop("preset", None)
    if name:
        settings = preset(name) | settings
    base, device = settings.pop("base", None), settings.pop("device", None)
    model = {"tokenizer": settings.pop("tokenizer", None), "prediction_type": settings.pop("prediction_type", None)}
    model = {k: getattr(args, k, None) or v for k, v in model.items()}
    for dest, key in FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            settings[key] = value
    if args.epochs is not None and args.steps is None:
        settings["steps"] = 0  # --epochs on the command line beats a step count from the file
    return settings, args.base or base, args.device or device, model


class _Bar:
    """A tqdm bar opened at the first step (after the dataset report and latent caching)."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=p.step - 1, unit="step", dynamic_ncols=True)
        bar = self.bar
        bar.n = p.step
        bar.set_postfix(loss=f"{p.smoothed_loss:.4f}", lr=f"{p.lr:.2e}", epoch=p.epoch, refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _saving_samples(host, output: str) -> None:
    """Wrap the host's sampler so previews are also written to ``<output stem>-samples/``."""
    import os

    render, folder = host.sample, os.path.splitext(output)[0] + "-samples"

    def sample(prompts, step):
        images = render(prompts, step)
        os.makedirs(folder, exist_ok=True)
        for i, im in enumerate(images):
            im.save(os.path.join(folder, f"step{step:06d}-{i}.png"))
        return images

    host.sample = sample


def _load_host(base: str, device: str | None, model: dict):
    """The training host of ``base``: the demo model, a single-file checkpoint or a diffusers folder."""
    import os

    import torch

    from ...train.diffusers_host import load_diffusers_folder
    from ...train.single_file import load_single_file
    from ..demo.base import is_demo_base

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_demo_base(base):
        from ..demo.base import load_demo
        from ..demo.concept import demo_host

        return demo_host(load_demo(base)[0].to(device))
    if os.path.isfile(base) or base.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")):
        return load_single_file(base, device=device, **model)
    if any(model.values()):
        print("lora-engine train: note: --tokenizer/--prediction-type apply to single-file checkpoints; "
              "a diffusers folder brings its own", file=sys.stderr)
    return load_diffusers_folder(base, device=device)


def _demo_settings(settings: dict) -> dict:
    """The demo model trains on its own 32x32 pixel grid: resolution and buckets are fixed."""
    from ...errors import TrainingError
    from ..demo.concept import DATASET

    given = settings.get("resolution", (settings.get("dataset") or {}).get("resolution"))
    if given is not None and int(given) != DATASET["resolution"]:
        raise TrainingError(f"the demo model trains at {DATASET['resolution']}x{DATASET['resolution']} pixels "
                            f"(resolution {given} asked); leave --resolution out")
    return {**settings, "dataset": {**(settings.get("dataset") or {}), **DATASET}}


@contextlib.contextmanager
def _ctrl_c_stops(trainer):
    """First Ctrl+C: stop after the current step and save (exit 130); a second one stops at once."""
    def handler(signum, frame):
        if trainer.cancel_requested:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        trainer.cancel()
        print("\nlora-engine train: stopping after this step and saving (Ctrl+C again stops at once)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(args) -> int:
    from ...train import Trainer, build_config
    from ..demo.base import is_demo_base

    settings, base, device, model = _settings(args)
    if base and is_demo_base(base):
        settings = _demo_settings(settings)
    cfg = build_config(settings)
    if not base:
        print("lora-engine train: no base model (--base FOLDER_OR_CHECKPOINT, --base demo, or base = ... in the "
              "config)", file=sys.stderr)
        return 2
    if not cfg.data_dir or not cfg.output:
        print("lora-engine train: --data and --output are required", file=sys.stderr)
        return 2
    if not (args.dry_run or args.resume):
        claim_output(cfg.output, args.overwrite)
    host = _load_host(base, device, model)
    if host.sample is not None:
        _saving_samples(host, cfg.output)
    trainer = Trainer(host, cfg, log=lambda line: print(line, file=sys.stderr))
    if args.dry_run:
        for line in trainer.report.lines():
            print(line)
        return 0
    bar = trainer.progress = _Bar(trainer.total_steps)
    try:
        with _ctrl_c_stops(trainer):
            result = trainer.run(resume=args.resume)
    finally:
        bar.close()
    what = "stopped" if result.cancelled else "done"
    print(f"{what} at step {result.steps}/{trainer.total_steps}: {result.output}"
          + (f" (resume with --resume {result.state_path})" if result.cancelled and result.state_path else ""))
    return 130 if result.cancelled else 0
