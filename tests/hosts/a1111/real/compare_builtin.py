"""lora-engine against A1111's built-in Lora inside a real, running AUTOMATIC1111 1.10 (API on).

Set-up (README.md, "Comparing with the built-in Lora in a real A1111"): this repo in
``extensions/lora-engine``, ``probe_extension/`` copied to ``extensions/lora-engine-probe``, models from
``make_models.py`` in A1111's ``models/`` and the matching checkpoint loaded. Then

    python -m tests.hosts.a1111.real.compare_builtin sd1|sd2|sdxl A1111_ROOT OUT_DIR [--url URL] [--size 128]
                                                     [--steps 4] [--every N]

Same seed, same stack (two LoRAs, one with separate te/unet weights, one negative), in this order:
base; ours merged; ours on the fly; base; built-in (hand-back setting); base; ours merged again; base.
Checks: our network holds ``<lora>``; ours = built-in image; the base images after each engine equal
the first bit for bit (weights restored); the weights each engine merged against an fp64
W0 + Σ m·(α/r)·up@down computed here from the files; restore bit for bit. Prints the figures and
``ALL CHECKS PASSED`` or the failed checks. Image checks apply to fp32 models (``--no-half``): in fp16
a random-weight model amplifies rounding, so there only the weights are compared.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_engine.keymap import build_keymap

STACK = ((0, 0.8, 0.8), (1, 0.6, -0.5))  # (LoRA index, te weight, unet weight)


class A1111:
    def __init__(self, url: str, every: int = 1, steps: int = 4):
        self.url, self.every, self.steps = url, every, steps

    def call(self, path: str, data=None, method: str | None = None):
        req = urllib.request.Request(self.url + path, data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:  # A1111's answer names the error (e.g. NansException)
            raise RuntimeError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None

    def image(self, prompt: str, size: int) -> np.ndarray:
        r = self.call("/sdapi/v1/txt2img", dict(prompt=prompt, negative_prompt="", seed=42, steps=self.steps,
                                                sampler_name="Euler", cfg_scale=7, width=size, height=size))
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0])))).astype(np.int16)

    def dump(self, path: str) -> dict[str, torch.Tensor]:
        self.call(f"/lora-engine-probe/dump?path={path}&every={self.every}", method="POST")
        return load_file(path)


def exact_weights(w0: dict, checkpoint: str, loras: list[str]) -> dict[str, torch.Tensor]:
    """fp64 W0 + Σ m·(α/r)·up@down, the key map built from the checkpoint file's own names (A1111 adds
    a ``wrapped.`` level to the text encoders; the fused OpenCLIP q/k/v rows come from the map)."""
    with safe_open(checkpoint, "pt") as fh:
        keymap = build_keymap({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    plain = {k.replace("wrapped.", ""): k for k in w0}
    ref = {k: v.double() for k, v in w0.items()}
    for (i, te, unet), path in zip(STACK, loras):
        f = load_file(path)
        for key in [k for k in f if k.endswith(".lora_down.weight")]:
            name = key[: -len(".lora_down.weight")]
            t = keymap.lookup(name)
            if t.weight_key not in plain:  # not in this dump (``--every``)
                continue
            down, up = f[key].double().flatten(1), f[name + ".lora_up.weight"].double().flatten(1)
            scale = f[name + ".alpha"].double().item() / down.shape[0]
            m = unet if name.startswith("lora_unet_") else te
            w = ref[plain[t.weight_key]]
            rows = w if t.rows is None else w[t.rows[0]:t.rows[1]]
            rows += (m * scale * (up @ down)).reshape(rows.shape)
    return ref


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("arch", choices=("sd1", "sd2", "sdxl"))
    ap.add_argument("a1111_root")
    ap.add_argument("out")
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--every", type=int, default=1, help="compare one targeted weight in N (SDXL: 8 saves RAM)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    api = A1111(args.url, args.every, args.steps)
    names = [f"{args.arch}_style{i}" for i, _, _ in STACK]
    loras = [os.path.join(args.a1111_root, "models", "Lora", n + ".safetensors") for n in names]
    checkpoint = os.path.join(args.a1111_root, "models", "Stable-diffusion", f"{args.arch}_random.safetensors")
    lora_prompt = "a photo of a cat " + " ".join(
        f"<lora:{n}:{te}>" if te == unet else f"<lora:{n}:{te}:{unet}>" for n, (_, te, unet) in zip(names, STACK))
    base_prompt = "a photo of a cat"
    failed: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            failed.append(what)

    api.call("/sdapi/v1/options", dict(lora_engine_handover=False, lora_engine_mode="merged",
                                       live_previews_enable=False))
    owner = api.call("/lora-engine-probe/registry").get("lora", "")
    check(owner.startswith("lora_engine_a1111."), f"<lora> is handled by lora-engine ({owner})")
    p = lambda name: os.path.join(args.out, name)  # noqa: E731
    w0 = api.dump(p("w0.safetensors"))
    img = {"base": api.image(base_prompt, args.size), "ours merged": api.image(lora_prompt, args.size)}
    w_ours = api.dump(p("w_ours.safetensors"))
    api.call("/sdapi/v1/options", dict(lora_engine_mode="on the fly"))
    img["ours on the fly"] = api.image(lora_prompt, args.size)
    img["base after ours"] = api.image(base_prompt, args.size)
    w_after_ours = api.dump(p("w_after_ours.safetensors"))
    api.call("/sdapi/v1/options", dict(lora_engine_handover=True))
    img["built-in"] = api.image(lora_prompt, args.size)
    w_builtin = api.dump(p("w_builtin.safetensors"))
    img["base after built-in"] = api.image(base_prompt, args.size)
    api.call("/sdapi/v1/options", dict(lora_engine_handover=False, lora_engine_mode="merged"))
    img["ours merged again"] = api.image(lora_prompt, args.size)
    img["base at the end"] = api.image(base_prompt, args.size)
    w_end = api.dump(p("w_end.safetensors"))
    for k, v in img.items():
        Image.fromarray(v.astype(np.uint8)).save(p(k.replace(" ", "_") + ".png"))

    half = next(iter(w0.values())).dtype != torch.float32
    effect = np.abs(img["base"] - img["built-in"])
    print(f"LoRA effect (base vs built-in): max {effect.max()}, mean {effect.mean():.3f} of 255")
    check(effect.max() >= 10, "the stack changes the image")
    for k in ("ours merged", "ours on the fly", "ours merged again"):
        d = np.abs(img[k] - img["built-in"])
        print(f"{k} vs built-in: max {d.max()}, mean {d.mean():.4f}, {100 * (d > 0).mean():.2f}% of values differ")
        if not half:
            check(d.max() <= 2, f"{k} = built-in image (fp32: within 2/255)")
    for k in ("base after ours", "base after built-in", "base at the end"):
        check(np.array_equal(img[k], img["base"]), f"{k} = first base image, bit for bit")
    for label, w in (("after ours", w_after_ours), ("at the end", w_end)):
        same = sum(torch.equal(w[k], w0[k]) for k in w0)
        check(same == len(w0), f"weights {label} = original, bit for bit ({same}/{len(w0)})")

    ref = exact_weights(w0, checkpoint, loras)
    changed = [k for k in w0 if not torch.equal(ref[k], w0[k].double())]
    err = {label: [(w[k].double() - ref[k]).abs() for k in changed] for label, w in
           (("ours", w_ours), ("built-in", w_builtin))}
    mean = {k: sum(e.sum().item() for e in v) / sum(e.numel() for e in v) for k, v in err.items()}
    peak = {k: max(e.max().item() for e in v) for k, v in err.items()}
    print(f"{len(changed)} weights changed; error against fp64: ours mean {mean['ours']:.3e} max {peak['ours']:.3e}, "
          f"built-in mean {mean['built-in']:.3e} max {peak['built-in']:.3e} (ratio {mean['ours'] / mean['built-in']:.3f})")
    check(sum(not torch.equal(w_ours[k], w0[k]) for k in w0) == len(changed), "ours changed exactly the LoRA's weights")
    bound = 1.0 if half else 1.1  # fp32: both within an ulp; half: one rounding against the built-in's several
    check(mean["ours"] <= bound * mean["built-in"], f"our merged weights are at least as exact as the built-in's (≤{bound}×)")
    print("ALL CHECKS PASSED" if not failed else f"{len(failed)} CHECKS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
