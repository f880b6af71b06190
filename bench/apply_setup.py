"""Parts of ``bench_apply`` / ``bench_sidepath``: machine figures (RSS or GPU memory, copy bandwidth, GEMM
rate), the real-size models filled in their own dtype on the CPU or a CUDA device, kohya LoRA files over
kohya's default targets, parameter fingerprints, and the diffusers pipeline object that loads the same files
through diffusers+PEFT. Every timing synchronises the device before and after (``timed``)."""
from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import time

import torch

GiB, MiB = 2 ** 30, 2 ** 20
UNET_PARTS = ("attn1", "attn2", "ff_net", "proj_in", "proj_out")
TE_PARTS = ("self_attn", "mlp_fc")
MODELS = {"sd15-fp32": ("sd1", torch.float32), "sd15-fp16": ("sd1", torch.float16),
          "sdxl-fp16": ("sdxl", torch.float16), "tiny": ("tiny", torch.float32)}


# ---- machine ------------------------------------------------------------------------------------
def proc_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def free_ram() -> int:
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))


_LIBC = ctypes.CDLL("libc.so.6")


class Ram:
    """Memory growth over a block, host and (for a CUDA ``device``) device: ``peak`` / ``steady`` are host
    RSS growth (VmHWM after a clear_refs reset; VmRSS after gc), ``dev_peak`` / ``dev_steady`` the CUDA
    caching allocator's ``max_memory_allocated`` / ``memory_allocated`` growth (0 on the CPU)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.dev_peak = self.dev_steady = 0

    def __enter__(self):
        gc.collect()
        _LIBC.malloc_trim(0)  # give freed heap pages back, so the baseline is what is really held
        self.base = proc_status("VmRSS")
        try:  # resets VmHWM to the current RSS; some sandboxes (gVisor) have no clear_refs
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.dev_base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.dev_peak = torch.cuda.max_memory_allocated() - self.dev_base
        # without a reset VmHWM is the whole process's peak, not this block's: not reported (nan)
        self.peak = proc_status("VmHWM") - self.base if self.hwm_reset else float("nan")
        gc.collect()
        _LIBC.malloc_trim(0)
        self.steady = proc_status("VmRSS") - self.base
        if self.cuda:
            self.dev_steady = torch.cuda.memory_allocated() - self.dev_base


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device | str | None = None) -> float:
    """Wall time of ``fn()``, the device's queue drained before and after (CUDA runs asynchronously)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def copy_bandwidth(nbytes: int = 512 * MiB, device="cpu") -> float:
    """Bytes read+written per second by a large fp32 tensor ``copy_`` (best of 5)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(5))
    return 2 * nbytes / best


def fresh_copy_rate(nbytes: int = 512 * MiB, device="cpu") -> float:
    """Bytes per second of a ``clone`` into freshly allocated memory (page faults included on the CPU;
    a cudaMalloc on CUDA, the caching allocator emptied first): what a first backup of the touched
    weights costs at best (best of 3)."""
    src = torch.randn(nbytes // 4, device=device)
    cuda = torch.device(device).type == "cuda"

    def clone():
        if cuda:
            torch.cuda.empty_cache()
        return timed(lambda: src.clone(), device)
    return nbytes / min(clone() for _ in range(3))


def gemm_rate(rank: int, device="cpu") -> float:
    """FLOP/s of the merge's product shape: (out x rank) @ (rank x in), fp32 (best of 3; 20 products
    per timing on CUDA, where one is a few microseconds)."""
    up, down = torch.randn(1280, rank, device=device), torch.randn(rank, 5120, device=device)
    up @ down
    k = 20 if torch.device(device).type == "cuda" else 1
    best = min(timed(lambda: [up @ down for _ in range(k)], device) for _ in range(3)) / k
    return 2 * 1280 * 5120 * rank / best


def free_memory(device="cpu") -> int:
    """Bytes free where the model will live: MemAvailable, or the CUDA device's free memory."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return free_ram()


# ---- models and files ---------------------------------------------------------------------------
def _fill(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.01, generator=g)


def build_model(arch: str, dtype: torch.dtype, device="cpu") -> torch.nn.Module:
    """A root holding ``unet`` (and ``text_encoder`` for SD1), as a diffusers pipeline holds them, on
    ``device`` (the UNet is filled there; the text encoder is seeded on the CPU and moved)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.fixtures.models.full_sd import CLIP_L, UNET
    from tests.fixtures.models.tiny_sd import TinySD

    root = torch.nn.Module()
    if arch == "tiny":
        m = TinySD.build("sd1")
        root.unet, root.text_encoder = m.unet.to(device, dtype), m.text_encoders[0].to(device, dtype)
        return root
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET[arch])
    unet = unet.to(dtype).to_empty(device=device).eval()
    _fill(unet, 0)
    root.unet = unet
    if arch == "sd1":
        torch.manual_seed(0)
        root.text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(device, dtype).eval()
    return root


def kohya_targets(keymap, arch: str) -> dict:
    """{kohya name: Target} over kohya's default targets, one name per weight, in the trainer's naming."""
    out, seen = {}, set()
    sgm = ("input_blocks", "middle_block", "output_blocks")
    for name in keymap.names():
        t = keymap.lookup(name)
        unet = name.startswith("lora_unet_")
        if not any(p in name for p in (UNET_PARTS if unet else TE_PARTS)) or (t.weight_key, t.rows) in seen:
            continue
        if len(t.shape) != 2 and not (len(t.shape) == 4 and tuple(t.shape[2:]) == (1, 1)):
            continue
        if unet and (any(s in name for s in sgm) != (arch == "sdxl")):
            continue
        seen.add((t.weight_key, t.rows))
        out[name] = t
    return out


def write_loras(folder: str, targets: dict, count: int, rank: int) -> list[str]:
    from safetensors.torch import save_file

    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        sd = {}
        for name, t in targets.items():
            o, rest = t.shape[0], t.shape[1:]
            sd[f"{name}.lora_down.weight"] = (torch.randn(rank, *rest, generator=g) * 0.05).half()
            sd[f"{name}.lora_up.weight"] = (torch.randn(o, rank, *([1, 1] if len(rest) == 3 else []),
                                                        generator=g) * 0.05).half()
            sd[f"{name}.alpha"] = torch.tensor(float(rank) / 2, dtype=torch.float16)
        paths.append(os.path.join(folder, f"lora{i}.safetensors"))
        save_file(sd, paths[-1], metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})
    return paths


def fingerprint(params: dict) -> dict:
    """What ``n_differ`` compares bit for bit: a blake2b digest of each CPU tensor; a copy of each tensor
    on its own device otherwise (hashing gigabytes through the host would dominate a GPU run)."""
    return {k: (hashlib.blake2b(memoryview(p.detach().contiguous().view(torch.uint8).numpy())).digest()
                if p.device.type == "cpu" else p.detach().clone()) for k, p in params.items()}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def n_differ(params: dict, before: dict) -> int:
    """How many parameters are not bit-identical to their ``fingerprint``."""
    n = 0
    for k, v in before.items():
        p = params[k]
        if isinstance(v, torch.Tensor):
            n += not _bits_equal(p.detach(), v)
        else:
            n += hashlib.blake2b(memoryview(p.detach().contiguous().view(torch.uint8).numpy())).digest() != v
    return n


# ---- one model ----------------------------------------------------------------------------------


def make_pipe(arch: str, root):
    """A diffusers pipeline object holding our modules (no VAE/tokenizer needed for LoRA loading)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = DDIMScheduler(clip_sample=False)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=root.unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=None, text_encoder=root.text_encoder, tokenizer=None, unet=root.unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe._lora_loadable_modules_present = [c for c in pipe._lora_loadable_modules if getattr(pipe, c, None) is not None]
    return pipe


def peft_load(pipe, path: str, name: str) -> None:
    """``load_lora_weights`` in its own two steps, with one key rename: diffusers names CLIP-L modules
    ``text_model.encoder…`` while transformers>=5 ``CLIPTextModel`` is flat (``encoder…``)."""
    unet = pipe.unet
    sd, alphas = pipe.lora_state_dict(path, unet_config=unet.config) if hasattr(pipe, "text_encoder_2") \
        else pipe.lora_state_dict(path)
    flat = pipe.text_encoder is not None and not hasattr(pipe.text_encoder, "text_model")

    def fix(d):
        if d is None or not flat:
            return d
        return {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in d.items()}
    sd, alphas = fix(sd), fix(alphas)
    pipe.load_lora_into_unet(sd, alphas, unet=unet, adapter_name=name, _pipeline=pipe)
    if pipe.text_encoder is not None:
        pipe.load_lora_into_text_encoder(sd, alphas, text_encoder=pipe.text_encoder, prefix="text_encoder",
                                         adapter_name=name, _pipeline=pipe)


# ---- driver -------------------------------------------------------------------------------------
def model_bytes(arch: str, dtype: torch.dtype) -> int:
    """Parameter bytes of the model ``build_model`` makes (the text encoder approximated)."""
    from diffusers import UNet2DConditionModel

    from tests.fixtures.models.full_sd import UNET
    if arch == "tiny":
        return 0
    with torch.device("meta"):
        n = sum(p.numel() for p in UNet2DConditionModel(**UNET[arch]).parameters())
    return (n + (123_000_000 if arch == "sd1" else 0)) * torch.empty((), dtype=dtype).element_size()
