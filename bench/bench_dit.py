"""Flux.1 and SD3.5-Medium LoRAs on full-width, reduced-depth transformers: load, merged apply / change /
restore against diffusers, extra RAM, on-the-fly overhead, and the figures extrapolated to the full depth.

    python bench/bench_dit.py [--models flux,sd35m] [--ranks 16,64] [--dialects kohya,diffusers] [--stacks 1,3]
                              [--reps 3] [--threads 1] [--no-diffusers] [--no-onthefly] [--otf-tokens 256]
                              [--flux-blocks 2,4] [--sd3-blocks 4] [--trees diffusers,native]

Models (diffusers classes built from their configs on the meta device, then filled with seeded random values
in bf16; width as released, depth reduced):
  flux   FluxTransformer2DModel, Flux.1-dev's config (3072 wide, 24 heads) with 2 double + 4 single blocks
  sd35m  SD3Transformer2DModel, SD3.5-Medium's config (1536 wide, attn2 in every block) with 4 blocks
  tiny-flux, tiny-sd35m  the tests' tiny configs (smoke test of this script)
LoRA files (fp16 factors, random, rank R, alpha R/2), N per (dialect, rank), over every weight inside the blocks:
  kohya      ``lora_unet_<native path>`` on the native (BFL / SD3 reference) tree: fused ``qkv``/``linear1``,
             written by the project's writer (``formats.writer.write_kohya``)
  diffusers  ``transformer.<diffusers path>.lora_A/B`` with the adapter config in the header, written by the
             project's writer (``write_diffusers``, what ``load_lora_weights`` reads)
Measured per (model, dialect, rank), each timing min over ``--reps`` where repeated:
  load       our ``load_lora`` (header, NaN/Inf scan, adapters), and it + one fp32 sum over every tensor (every
             byte used), against a raw ``read()`` of the file (warm page cache; bench_load's functions); goal ≤ 1.5×
  apply      ours: ``LoraEngine(merged).set_stack`` of the first n files (weights 1.0, 0.8, 0.6); diffusers:
             ``<Pipeline>.lora_state_dict`` + ``transformer.load_lora_adapter`` once per file (timed as its load),
             then ``set_adapters`` + ``fuse_lora`` (its apply)
  change     the last LoRA's weight ×0.5. Ours: ``set_stack`` (rewrites the changed slots); diffusers:
             ``unfuse_lora`` + ``set_adapters`` + ``fuse_lora``; goal ≤ 0.5× diffusers
  restore    ours ``restore()``, diffusers ``unfuse_lora``; "exact" = blake2b of every parameter equal to before
             the apply; for diffusers the number of weights that differ after its unfuse
  RAM        peak (VmHWM after a clear_refs reset) and steady (VmRSS after gc) growth over our apply, ÷ the bytes
             of the weights it writes (touched); goal ≤ 1.1×
  on the fly a separate fp32 model of the same width with ``--otf-blocks`` blocks (CPU bf16 GEMMs run at a few
             GFLOP/s here; the ratio is what counts): one forward captures every block layer's input
             (``--otf-tokens`` image tokens + a quarter as many text tokens), then each layer is timed without
             and with the side path, call by call (bench_sidepath's ``measure``), ours and diffusers+PEFT
             unfused, on the diffusers-dialect files; extra time ÷ LoRA FLOP share, goal ≤ 1.3×
Extrapolation: apply / change / restore / RAM / file size scale with the bytes of the weights the LoRAs touch,
which are counted on the meta-device model of the full depth (Flux.1-dev: 19 double + 38 single = 57 blocks;
SD3.5-Medium: 24 blocks): full-depth figure = measured × (full-depth touched bytes ÷ measured touched bytes).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_engine.engine import LoraEngine, Mode, shapes_of  # noqa: E402
from lora_engine.formats import load_lora  # noqa: E402
from lora_engine.formats.writer import LoraTensors, write_diffusers, write_kohya  # noqa: E402
from lora_engine.keymap import build_keymap  # noqa: E402
from lora_engine.patch import StackEntry  # noqa: E402

from bench.apply_setup import MiB, Ram, _fill, fingerprint, free_ram, n_differ, timed  # noqa: E402
from bench.bench_load import load_and_touch, load_only, raw_read  # noqa: E402
from bench.bench_sidepath import capture_inputs, measure  # noqa: E402
from tests.fixtures.models.flux import (FLUX_DEV, SD35_MEDIUM, TINY_FLUX, TINY_SD35M,  # noqa: E402
                                        NativeTree, native_state)

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")  # diffusers, both families
NATIVE_BLOCKS = ("double_blocks.", "single_blocks.", "joint_blocks.")
# name: (family, bench config, full-depth config, full-depth label)
MODELS = {
    "flux": ("flux", dict(FLUX_DEV, num_layers=2, num_single_layers=4), FLUX_DEV, "Flux.1-dev, 19+38 blocks"),
    "sd35m": ("sd3", dict(SD35_MEDIUM, num_layers=4, dual_attention_layers=(0, 1, 2, 3)), SD35_MEDIUM,
              "SD3.5-Medium, 24 blocks"),
    "tiny-flux": ("flux", dict(TINY_FLUX, num_single_layers=2), dict(TINY_FLUX, num_layers=2, num_single_layers=4),
                  "tiny Flux, 2+4 blocks"),
    "tiny-sd35m": ("sd3", TINY_SD35M, dict(TINY_SD35M, num_layers=8), "tiny SD3.5-M, 8 blocks"),
}


# ---- models -------------------------------------------------------------------------------------
def model_class(family: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    return FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel


def pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    return FluxPipeline if family == "flux" else StableDiffusion3Pipeline


def meta_model(family: str, config: dict):
    with torch.device("meta"):
        return model_class(family)(**config)


def build(family: str, config: dict, dtype: torch.dtype, seed: int = 0):
    """The model on the CPU in ``dtype``, built on the meta device and filled in place (seeded)."""
    m = meta_model(family, config).to(dtype).to_empty(device="cpu").eval().requires_grad_(False)
    _fill(m, seed)
    return m


def build_native(family: str, config: dict, dtype: torch.dtype, seed: int = 0):
    """The native (BFL / SD3 reference) tree of the same config, as ComfyUI holds it: fused ``qkv`` /
    ``linear1``; built on the meta device (the tests' ``NativeTree``), then filled in place (seeded)."""
    tree = NativeTree(native_state(meta_model(family, config).to(dtype), family))
    tree = tree.to_empty(device="cpu").eval().requires_grad_(False)
    _fill(tree, seed)
    return tree


def block_linears(model) -> dict[str, tuple[int, int]]:
    """{diffusers module path: (out, in)} of every Linear inside the transformer blocks."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(BLOCK_PREFIXES)}


def native_block_weights(family: str, config: dict) -> dict[str, tuple[int, int]]:
    """{native module path: (out, in)} of every 2-D weight inside the native tree's blocks (meta device)."""
    state = native_state(meta_model(family, config), family)
    return {k[:-len(".weight")]: tuple(v.shape) for k, v in state.items()
            if k.startswith(NATIVE_BLOCKS) and k.endswith(".weight") and v.ndim == 2}


def touched_bytes(shapes: dict, dtype=torch.bfloat16) -> int:
    return sum(o * i for o, i in shapes.values()) * torch.empty((), dtype=dtype).element_size()


# ---- files --------------------------------------------------------------------------------------
def lora_modules(shapes: dict, rank: int, seed: int) -> dict[str, LoraTensors]:
    g = torch.Generator().manual_seed(seed)
    return {name: LoraTensors(down=(torch.randn(rank, i, generator=g) * 0.05).half(),
                              up=(torch.randn(o, rank, generator=g) * 0.05).half(),
                              alpha=torch.tensor(rank / 2, dtype=torch.float16))
            for name, (o, i) in shapes.items()}


def write_files(folder: str, dialect: str, family: str, config: dict, model, rank: int, count: int) -> list[str]:
    paths = []
    for k in range(count):
        path = os.path.join(folder, f"{dialect}_r{rank}_{k}.safetensors")
        if dialect == "kohya":
            mods = lora_modules(native_block_weights(family, config), rank, 100 + k)
            write_kohya(path, {"lora_unet_" + n.replace(".", "_"): t for n, t in mods.items()})
        else:
            write_diffusers(path, {"transformer": lora_modules(block_linears(model), rank, 100 + k)})
        paths.append(path)
    return paths


# ---- diffusers ----------------------------------------------------------------------------------
def diffusers_load(model, family: str, path: str, name: str) -> int:
    """``<Pipeline>.lora_state_dict`` + ``load_lora_adapter`` (what ``load_lora_weights`` does for the
    transformer); returns how many layers got this adapter (0: diffusers dropped the file)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = pipeline_class(family)
    try:
        if family == "flux":
            sd, alphas = pipe.lora_state_dict(path, return_alphas=True)
        else:
            sd, alphas = pipe.lora_state_dict(path), None
        # diffusers 0.42's kohya converter drops the "transformer." prefix of the top-level layers (none here)
        sd = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in sd.items()}
        model.load_lora_adapter(sd, prefix="transformer", network_alphas=alphas, adapter_name=name)
    except (AssertionError, IndexError, ValueError, KeyError, RuntimeError) as e:  # e.g. its kohya converter asserts
        print(f"    diffusers could not load {os.path.basename(path)}: {type(e).__name__} "
              f"{(str(e).splitlines() or [''])[0][:120]}")
        return 0
    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and name in m.lora_A)


def diffusers_merged(model, params: dict, names: list[str], weights: list[float]) -> dict:
    before = fingerprint(params)

    def apply(w):
        model.set_adapters(names, w)
        model.fuse_lora(adapter_names=names)

    with Ram() as ram:
        t_apply = timed(lambda: apply(weights))
    t_change = timed(lambda: (model.unfuse_lora(), apply(weights[:-1] + [weights[-1] * 0.5])))
    t_restore = timed(model.unfuse_lora)
    return dict(apply=t_apply, change=t_change, restore=t_restore, diff=n_differ(params, before), peak=ram.peak)


# ---- ours ---------------------------------------------------------------------------------------
def ours_merged(model, keymap, params: dict, files: list, weights: list[float]) -> dict:
    engine = LoraEngine(model, keymap, Mode.MERGED)
    before = fingerprint(params)
    stack = [StackEntry(f, te=w, unet=w) for f, w in zip(files, weights)]
    with Ram() as ram:
        t_apply = timed(lambda: engine.set_stack(stack))
    touched, slots = engine.stats.bytes_written, engine.stats.slots_written
    last = stack[-1]
    changed = stack[:-1] + [StackEntry(last.lora, te=last.te * 0.5, unet=last.unet * 0.5)]
    t_change = timed(lambda: engine.set_stack(changed))
    change_bytes = engine.stats.bytes_written
    t_restore = timed(engine.restore)
    return dict(apply=t_apply, change=t_change, restore=t_restore, diff=n_differ(params, before), peak=ram.peak,
                steady=ram.steady, touched=touched, slots=slots, change_bytes=change_bytes)


def best_of(run, reps: int) -> dict:
    """Each timing min over ``reps`` runs; the rest from the first."""
    out = run()
    for _ in range(reps - 1):
        again = run()
        for k in ("apply", "change", "restore"):
            out[k] = min(out[k], again[k])
    return out


# ---- on the fly ---------------------------------------------------------------------------------
def model_forward(model, family: str, tokens: int):
    """One forward on seeded random inputs: ``tokens`` image tokens, tokens/4 text tokens, batch 1."""
    g = torch.Generator().manual_seed(0)
    cfg, dt = model.config, model.dtype
    text = torch.randn(1, max(tokens // 4, 1), cfg.joint_attention_dim, generator=g).to(dt)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dt)
    t = torch.tensor([500.0])
    if family == "flux":
        x = torch.randn(1, tokens, cfg.in_channels, generator=g).to(dt)
        img_ids, txt_ids = torch.zeros(tokens, 3), torch.zeros(text.shape[1], 3)
        img_ids[:, 2] = torch.arange(tokens)
        extra = dict(guidance=torch.tensor([3.5])) if cfg.guidance_embeds else {}
        return lambda: model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t / 1000,
                             img_ids=img_ids, txt_ids=txt_ids, **extra)
    side = max(int((tokens ** 0.5)) * cfg.patch_size, cfg.patch_size)
    x = torch.randn(1, cfg.in_channels, side, side, generator=g).to(dt)
    return lambda: model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t)


def run_onthefly(name: str, args, folder: str) -> list:
    family, config, _, _ = MODELS[name]
    blocks = dict(num_layers=args.otf_blocks, num_single_layers=args.otf_blocks) if family == "flux" else \
        dict(num_layers=args.otf_blocks, dual_attention_layers=tuple(range(args.otf_blocks)))
    if name.startswith("tiny"):
        blocks = {}
    model = build(family, dict(config, **blocks), torch.float32, seed=1)
    paths = list(block_linears(model))
    inputs = capture_inputs(model, paths, model_forward(model, family, args.otf_tokens))
    print(f"  on the fly: {len(inputs)} layers, {args.otf_tokens} image tokens, fp32", flush=True)
    keymap = build_keymap(shapes_of(model))
    rows = []
    for rank in args.ranks:
        files = write_files(folder, "diffusers", family, config, model, rank, max(args.stacks))
        loras = [load_lora(p) for p in files]
        engine = LoraEngine(model, keymap, Mode.ONTHEFLY)
        for n in args.stacks:
            stack = [StackEntry(f, te=w, unet=w) for f, w in zip(loras[:n], weights(n))]
            ours = measure(model, inputs, lambda: engine.set_stack(stack), engine.restore, args.rounds, args.reps,
                           lambda m: m.forward)
            rows.append([name, rank, n, ours, None])
            print(f"    ours r={rank} n={n}: base {ours[0]:.3f}s with {ours[1]:.3f}s share {ours[2]:.4f}", flush=True)
        engine.restore()
        if not args.no_diffusers:
            for k, p in enumerate(files):
                diffusers_load(model, family, p, f"o{k}")
            for row in rows[-len(args.stacks):]:
                n = row[2]
                names = [f"o{k}" for k in range(n)]
                on = lambda: (model.enable_adapters(), model.set_adapters(names, weights(n)))  # noqa: E731
                row[4] = measure(model, inputs, on, model.disable_adapters, args.rounds, args.reps, lambda m: getattr(m, "base_layer", m))
                print(f"    diffusers+PEFT r={rank} n={n}: base {row[4][0]:.3f}s with {row[4][1]:.3f}s", flush=True)
            model.unload_lora()
    del model, inputs
    gc.collect()
    return rows


# ---- driver -------------------------------------------------------------------------------------
def weights(n: int) -> list[float]:
    return [1.0 - 0.2 * k for k in range(n)]


def merged_rows(name: str, tree: str, model, family: str, config: dict, args, folder: str, scale: float,
                diffusers: bool) -> list:
    """Load and merged rows for every (dialect, rank) on ``model`` (the diffusers or the native tree)."""
    params = dict(model.named_parameters())
    keymap = build_keymap(shapes_of(model))
    linears = meta_model(family, config)
    rows = []
    for dialect in args.dialects:
        for rank in args.ranks:
            files = write_files(folder, dialect, family, config, linears, rank, max(args.stacks))
            size = os.path.getsize(files[0])
            raw_read(files[0])
            t_raw = min(timed(lambda: raw_read(files[0])) for _ in range(args.reps))
            t_parse = min(timed(lambda: load_only(files[0])) for _ in range(args.reps))
            t_load = min(timed(lambda: load_and_touch(files[0])) for _ in range(args.reps))
            loras = [load_lora(p) for p in files]
            row = dict(model=name, tree=tree, dialect=dialect, rank=rank, size=size, raw=t_raw, parse=t_parse,
                       load=t_load, scale=scale, ours={}, diff={}, loaded=None)
            print(f"  {tree} tree, {dialect} r={rank}: {size / MiB:.1f} MiB, raw read {t_raw:.3f}s, "
                  f"load+touch {t_load:.3f}s", flush=True)
            for n in args.stacks:
                row["ours"][n] = best_of(lambda: ours_merged(model, keymap, params, loras[:n], weights(n)), args.reps)
                print(f"    ours n={n}: " + ", ".join(f"{k} {v:.3g}" for k, v in row["ours"][n].items()), flush=True)
            del loras
            if diffusers:
                t0 = time.perf_counter()
                loaded = [diffusers_load(model, family, p, f"l{k}") for k, p in enumerate(files)]
                row["diffusers_load"] = time.perf_counter() - t0
                row["loaded"] = loaded[0]
                if all(loaded):
                    for n in args.stacks:
                        names = [f"l{k}" for k in range(n)]
                        row["diff"][n] = best_of(lambda: diffusers_merged(model, params, names, weights(n)), args.reps)
                        print(f"    diffusers n={n}: " + ", ".join(f"{k} {v:.3g}" for k, v in row["diff"][n].items()),
                              flush=True)
                else:
                    print(f"    diffusers loaded this {dialect} file onto {loaded[0]} layers: not compared", flush=True)
                if any(loaded):
                    model.unload_lora()
            rows.append(row)
            gc.collect()
    return rows


def run_model(name: str, args, folder: str) -> list:
    family, config, full, label = MODELS[name]
    t0 = time.perf_counter()
    full_bytes, bench_bytes = (touched_bytes(block_linears(meta_model(family, c))) for c in (full, config))
    scale = full_bytes / bench_bytes
    print(f"{name}: full depth ({label}) touches {scale:.2f}× its block weights", flush=True)
    rows = []
    if "diffusers" in args.trees:
        model = build(family, config, torch.bfloat16)
        print(f"  diffusers tree: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, bf16, built in "
              f"{time.perf_counter() - t0:.0f}s; free RAM {free_ram() / 2 ** 30:.1f} GiB", flush=True)
        rows += merged_rows(name, "diffusers", model, family, config, args, folder, scale, not args.no_diffusers)
        del model
        gc.collect()
    if "native" in args.trees:
        t0 = time.perf_counter()
        tree = build_native(family, config, torch.bfloat16)
        print(f"  native tree: built in {time.perf_counter() - t0:.0f}s", flush=True)
        rows += merged_rows(name, "native", tree, family, config, args, folder, scale, False)
        del tree
        gc.collect()
    return rows


def _r(a, b) -> str:
    return f"{a / b:.2f}" if b else "-"


def print_tables(rows: list, otf: list) -> None:
    print("\n| model | tree | dialect | rank | file MiB | raw read s | load_lora s | × raw | load+touch s | × raw | "
          "diffusers load s (3 files) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dl = f"{r['diffusers_load']:.3f}" if "diffusers_load" in r else "-"
        print(f"| {r['model']} | {r['tree']} | {r['dialect']} | {r['rank']} | {r['size'] / MiB:.1f} | {r['raw']:.4f} | "
              f"{r['parse']:.4f} | {r['parse'] / r['raw']:.2f} | {r['load']:.4f} | {r['load'] / r['raw']:.2f} | {dl} |")
    print("\n| model | tree | dialect | rank | n | touched MiB | ours apply s | diffusers apply s | ours change s | "
          "diffusers change s | change ours ÷ diffusers | ours restore s | exact | diffusers unfuse s | "
          "diffusers weights differing | RAM peak / steady ×touched | diffusers fuse peak ×touched |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
    for r in rows:
        for n, o in r["ours"].items():
            d = r["diff"].get(n, {})
            if d:
                differing = f"{d['diff']} of {o['slots']}"
            else:
                differing = f"(diffusers loaded it on {r['loaded']} layers)" if r["loaded"] is not None else "-"
            print(f"| {r['model']} | {r['tree']} | {r['dialect']} | {r['rank']} | {n} | {o['touched'] / MiB:.0f} | "
                  f"{o['apply']:.3f} | {d.get('apply', float('nan')):.3f} | {o['change']:.3f} | "
                  f"{d.get('change', float('nan')):.3f} | {_r(o['change'], d.get('change', 0))} | "
                  f"{o['restore']:.3f} | {'yes' if o['diff'] == 0 else 'NO %d' % o['diff']} | "
                  f"{d.get('restore', float('nan')):.3f} | {differing} | "
                  f"{o['peak'] / o['touched']:.2f} / {o['steady'] / o['touched']:.2f} | "
                  f"{d.get('peak', float('nan')) / o['touched']:.2f} |")
    print("\nExtrapolated to the full depth (× the touched-bytes ratio):")
    print("\n| model (full depth) | tree | dialect | rank | n | touched GiB | ours apply s | ours change s | "
          "ours restore s | "
          "diffusers apply s | diffusers change s | diffusers unfuse s | file MiB | load+touch s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        k = r["scale"]
        for n, o in r["ours"].items():
            d = r["diff"].get(n, {})
            print(f"| {MODELS[r['model']][3]} | {r['tree']} | {r['dialect']} | {r['rank']} | {n} | "
                  f"{o['touched'] * k / 2 ** 30:.2f} | "
                  f"{o['apply'] * k:.2f} | {o['change'] * k:.2f} | {o['restore'] * k:.2f} | "
                  f"{d.get('apply', float('nan')) * k:.2f} | {d.get('change', float('nan')) * k:.2f} | "
                  f"{d.get('restore', float('nan')) * k:.2f} | {r['size'] * k / MiB:.0f} | {r['load'] * k:.2f} |")
    if otf:
        print("\nOn the fly (fp32 model of the same width, per layer, min over rounds):")
        print("\n| model | rank | n | Σ base ms | ours +% | diffusers+PEFT unfused +% | LoRA FLOP share % | "
              "ours ÷ share | PEFT ÷ share |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, rank, n, ours, peft in otf:
            b, w, share = ours
            o = 100 * (w - b) / b
            p = 100 * (peft[1] - peft[0]) / peft[0] if peft else float("nan")
            print(f"| {name} | {rank} | {n} | {1000 * b:.0f} | {o:.1f} | {p:.1f} | {100 * share:.2f} | "
                  f"{o / (100 * share):.2f} | {p / (100 * share):.2f} |")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="flux,sd35m", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--flux-blocks", default="2,4", help="double,single blocks of the flux model")
    ap.add_argument("--sd3-blocks", type=int, default=4, help="blocks of the sd35m model")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--dialects", default="kohya,diffusers")
    ap.add_argument("--stacks", default="1,3")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="on the fly: interleaved rounds per layer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-merged", action="store_true")
    ap.add_argument("--no-onthefly", action="store_true")
    ap.add_argument("--trees", default="diffusers,native",
                    help="merged runs on the diffusers tree (ours and diffusers) and/or the native tree (fused "
                         "qkv/linear1, as ComfyUI holds the model; ours only)")
    ap.add_argument("--otf-blocks", type=int, default=1, help="blocks of each kind in the on-the-fly model")
    ap.add_argument("--otf-tokens", type=int, default=256)
    ap.add_argument("--dir", help="folder for the LoRA files (default: a temp dir, removed)")
    args = ap.parse_args()
    args.models = args.models.split(",")
    if bad := [m for m in args.models if m not in MODELS]:
        ap.error(f"unknown model(s) {bad}")
    double, single = (int(x) for x in args.flux_blocks.split(","))
    MODELS["flux"][1].update(num_layers=double, num_single_layers=single)
    MODELS["sd35m"][1].update(num_layers=args.sd3_blocks, dual_attention_layers=tuple(range(args.sd3_blocks)))
    args.ranks = [int(x) for x in args.ranks.split(",")]
    args.dialects = args.dialects.split(",")
    args.trees = args.trees.split(",")
    args.stacks = [int(x) for x in args.stacks.split(",")]
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog
    dlog.set_verbosity_error()
    print(f"CPU, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, free RAM "
          f"{free_ram() / 2 ** 30:.1f} GiB", flush=True)
    folder = args.dir or tempfile.mkdtemp(prefix="bench_dit_")
    rows, otf = [], []
    try:
        for name in args.models:
            if not args.no_merged:
                rows += run_model(name, args, folder)
            if not args.no_onthefly:
                otf += run_onthefly(name, args, folder)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    print_tables(rows, otf)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
