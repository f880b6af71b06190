"""CPU thread counts for the long commands: the default policy against explicit settings, in one run.

    python bench/bench_threads.py [--rounds 2] [--configs default,omp1,1,2] [--commands train,generate,grid,...]

Each command runs as a subprocess (``python -m lora_engine …``), as a user runs it. On the demo model
(the policy gives it one thread):

- ``train``: ``train --base demo`` on 16 concept images, batch 8; seconds per step from the progress bar;
- ``generate``: ``generate demo "… <lora:…:1>"``, 10 steps; wall time of the whole command;
- ``grid``: the web UI's weight-sweep grid (2 LoRAs x 5 weights, 20 steps), run by the UI's own
  ``SweepRunner`` in a child process that applies the thread policy as ``serve --model demo`` does; the
  grid's seconds.

On a diffusers Stable Diffusion folder built from configs (UNet 64/128/128 channels, the tests' tiny VAE
and CLIP; random weights: only the time matters), where the policy's core count applies:

- ``train-sd``: ``train --base FOLDER``, 64x64 images, batch 4; seconds per step;
- ``generate-sd``: ``generate FOLDER "… <lora:…:1>"``, 64x64, 10 steps; wall time of the whole command.

Configurations: ``default`` (no ``--threads``, no ``OMP_NUM_THREADS``: the policy of
``lora_engine.apps.threads``), ``omp1`` (``OMP_NUM_THREADS=1``), and ``N`` (``--threads N``; N = the
number of CPUs is torch's own default). Rounds interleave the configurations so a busy machine's drift
hits all of them. Printed: the median per configuration, its ratio to the best, and the load (``uptime``)
before and after. Goal: the default within 1.2x of the best setting.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average %.2f, %.2f, %.2f" % os.getloadavg()


def _env(config: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if config == "omp1":
        env["OMP_NUM_THREADS"] = "1"
    return env


def _threads_args(config: str) -> list[str]:
    return ["--threads", config] if config.isdigit() else []


def _run(argv: list[str], config: str, cwd: str) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, *argv, *_threads_args(config)], cwd=cwd, env=_env(config),
                          capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} [{config}] failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def seconds_per_step(log: str) -> float:
    """The progress bar's last rate ("1.62step/s" or "3.45s/step")."""
    rate, unit = re.findall(r"(\d+(?:\.\d+)?)(s/step|step/s)", log)[-1]
    return float(rate) if unit == "s/step" else 1.0 / float(rate)


def measure(command: str, config: str, work: str, a: argparse.Namespace) -> float:
    if command == "train-sd":
        _, log = _run(["-m", "lora_engine", "train", "--base", "sd", "--data", "squares", "--output", "s.safetensors",
                       "--steps", str(a.train_steps), "--batch-size", "4", "--resolution", "64", "--overwrite"],
                      config, work)
        return seconds_per_step(log)
    if command == "generate-sd":
        seconds, _ = _run(["-m", "lora_engine", "generate", "sd", "red square <lora:sd_style:1>", "--lora-dir", "sd_loras",
                           "--steps", str(a.gen_steps), "--width", "64", "--height", "64", "--out", "sd_images"],
                          config, work)
        return seconds
    if command == "train":
        _, log = _run(["-m", "lora_engine", "train", "--base", "demo", "--data", "data", "--output", "t.safetensors",
                       "--steps", str(a.train_steps), "--batch-size", "8", "--overwrite"], config, work)
        return seconds_per_step(log)
    if command == "generate":
        seconds, _ = _run(["-m", "lora_engine", "generate", "demo", "a purple circle <lora:purple_a:1>", "--lora-dir",
                           "loras", "--steps", str(a.gen_steps), "--out", "images"], config, work)
        return seconds
    _, log = _run([os.path.abspath(__file__), "--grid-child", "loras", "--grid-steps", str(a.grid_steps)], config, work)
    return json.loads(log.strip().splitlines()[-1])["seconds"]


def grid_child(a: argparse.Namespace) -> None:
    """The web UI's grid with the thread policy ``serve --model demo`` applies."""
    from lora_engine.apps.threads import choose_threads, torch_threads
    from lora_engine.apps.ui.sweep import DemoGenerator, SweepRunner, SweepSpec
    from lora_engine.loras import Loras

    with torch_threads(choose_threads(a.threads, small_model=True)) as choice:
        runner = SweepRunner(DemoGenerator(), Loras([a.grid_child]))
        spec = SweepSpec("a purple circle", ("purple_a", "purple_b"), steps=a.grid_steps)
        t = time.perf_counter()
        runner.grid(spec)
        print(json.dumps({"seconds": time.perf_counter() - t, "threads": choice.threads}))


def setup_sd(work: str) -> None:
    """A diffusers SD pipeline folder, 64x64 coloured squares with captions, and a LoRA for the pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from lora_engine.apps.generate import pipeline_root
    from lora_engine.engine import shapes_of
    from lora_engine.keymap import build_keymap
    from tests.fixtures.files.kohya import write_kohya
    from tests.train.models import make_dataset, tiny_parts

    parts = tiny_parts(work)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        norm_num_groups=8, cross_attention_dim=12, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(work, "sd"))
    make_dataset(os.path.join(work, "squares"), 8, size=(64, 64))
    os.makedirs(os.path.join(work, "sd_loras"))
    write_kohya(os.path.join(work, "sd_loras", "sd_style.safetensors"), build_keymap(shapes_of(pipeline_root(pipe))),
                seed=3, rank=4, alpha=4.0, fraction=1.0)


def setup(work: str, commands: list[str]) -> None:
    """16 concept images and two small demo LoRAs (trained in this process, one thread); the SD folder."""
    import shutil

    import torch

    if any(c.endswith("-sd") for c in commands):
        setup_sd(work)

    from lora_engine.apps.demo.base import get_base
    from lora_engine.apps.demo.concept import ConceptSettings, train_concept, write_concept_images

    torch.set_num_threads(1)
    write_concept_images(os.path.join(work, "data"), 16, seed=7)
    model, _ = get_base()
    os.makedirs(os.path.join(work, "loras"))
    res = train_concept(model, os.path.join(work, "data"), os.path.join(work, "loras", "purple_a.safetensors"),
                        ConceptSettings(steps=4, batch_size=4))
    shutil.copy(res.output, os.path.join(work, "loras", "purple_b.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--configs", default=None, help="comma list of default, omp1, N (default: default,omp1,1..CPUs)")
    p.add_argument("--commands", default="train,generate,grid,train-sd,generate-sd")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--gen-steps", type=int, default=10)
    p.add_argument("--grid-steps", type=int, default=20)
    p.add_argument("--grid-child", metavar="LORA_DIR", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.grid_child:
        return grid_child(a)
    from lora_engine.apps.threads import choose_threads, usable_cores

    cpus = os.cpu_count() or 1
    configs = a.configs.split(",") if a.configs else ["default", "omp1"] + [str(n) for n in range(1, cpus + 1)]
    commands = a.commands.split(",")
    print(f"before: {_uptime()}")
    policy = choose_threads(None)
    print(f"{cpus} CPUs, {usable_cores()} usable physical cores; the policy now: {policy.threads} thread(s) for "
          f"the SD folder ({policy.reason}), 1 for the demo model")
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_threads-") as work:
        setup(work, commands)
        for r in range(a.rounds):
            for command in commands:
                for config in configs:
                    t = measure(command, config, work, a)
                    times.setdefault((command, config), []).append(t)
                    print(f"round {r + 1} {command:<8} {config:<7} {t:8.3f}", flush=True)
    print(f"after: {_uptime()}\n")
    units = {"train": "s/step", "generate": "s (whole command)", "grid": "s (2x5 grid)", "train-sd": "s/step",
             "generate-sd": "s (whole command)"}
    print("| command | threads | median | × best |")
    print("|---|---|---:|---:|")
    for command in commands:
        med = {c: statistics.median(times[(command, c)]) for c in configs}
        best = min(med.values())
        for c in configs:
            label = {"default": "default policy", "omp1": "OMP_NUM_THREADS=1"}.get(c, f"--threads {c}")
            if c == str(cpus):
                label += " (= torch's default)"
            print(f"| {command} | {label} | {med[c]:.3f} {units[command]} | {med[c] / best:.2f} |")


if __name__ == "__main__":
    main()
