"""The "lora-engine" settings section, and a typed snapshot of it.

Options are declared once (``OPTIONS``); ``register()`` adds them to A1111 (``on_ui_settings``),
``Settings.from_opts(opts)`` reads them back from anything with attributes (A1111's
``shared.opts``), falling back to the declared defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

SECTION = ("lora_engine", "lora-engine")
MODES = ("automatic", "merged", "on the fly")
BACKUPS = ("host memory", "GPU memory")


@dataclass(frozen=True)
class Option:
    key: str
    default: object
    label: str
    kind: str = "text"  # text | checkbox | radio | number | slider
    choices: tuple = ()
    info: str = ""


OPTIONS = (
    Option("lora_engine_mode", "automatic", "How LoRAs are applied", "radio", MODES,
           "merged: fastest steps; on the fly: weights untouched, per-image/negative/scheduled LoRAs; "
           "automatic: merged for static stacks, on the fly otherwise and over FP8 weights"),
    Option("lora_engine_cache_mb", 2048, "LoRA file cache size (MB of tensors kept in RAM)", "number"),
    Option("lora_engine_folders", "", "Extra LoRA folders (separated by ;), in addition to --lora-dir and "
           "--lyco-dir-backcompat"),
    Option("lora_engine_default_weight", 1.0, "Weight a card click or prompt autocomplete inserts when the LoRA has "
           "no preferred weight", "slider", (-2.0, 2.0, 0.05)),
    Option("lora_engine_warnings", True, "Show LoRA warnings (unknown names, failed files, unmatched keys) "
           "under the image", "checkbox"),
    Option("lora_engine_backups", "host memory", "Where merged mode keeps the original weights", "radio", BACKUPS,
           "GPU memory: faster LoRA switches, costs VRAM equal to the weights the LoRAs touch (SD1.5 ~0.4 GB, "
           "SDXL ~2-4 GB in fp16); takes effect at the next generation"),
    Option("lora_engine_force_foreign", False, "Apply LoRAs made for another model family (only the modules "
           "whose names and shapes happen to fit)", "checkbox",
           info="off: such a LoRA (e.g. SDXL on an SD1.5 model) is skipped with a warning naming its family"),
    Option("lora_engine_max_strength", 100.0, "Warn about LoRA strengths beyond ± this value", "number"),
    Option("lora_engine_handover", False, "Hand <lora:...> tags back to the built-in Lora extension", "checkbox",
           info="takes effect at the next generation; our patches are removed first"),
)
DEFAULTS = {o.key: o.default for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    mode: str = "automatic"
    cache_mb: float = 2048
    folders: tuple[str, ...] = ()
    default_weight: float = 1.0
    warnings: bool = True
    handover: bool = False
    backups: str = "host memory"
    force_foreign: bool = False
    max_strength: float = 100.0

    @property
    def backup_device(self) -> str:
        """The engine's ``backup_device`` for this choice."""
        return "same" if self.backups == "GPU memory" else "cpu"

    @classmethod
    def from_opts(cls, opts) -> "Settings":
        def get(key):
            value = getattr(opts, key, None) if opts is not None else None
            return DEFAULTS[key] if value is None else value

        mode = str(get("lora_engine_mode"))
        folders = tuple(f.strip() for f in str(get("lora_engine_folders")).split(";") if f.strip())
        backups = str(get("lora_engine_backups"))
        try:
            max_strength = abs(float(get("lora_engine_max_strength"))) or DEFAULTS["lora_engine_max_strength"]
        except (TypeError, ValueError):
            max_strength = DEFAULTS["lora_engine_max_strength"]
        return cls(mode if mode in MODES else "automatic", float(get("lora_engine_cache_mb")), folders,
                   float(get("lora_engine_default_weight")), bool(get("lora_engine_warnings")),
                   bool(get("lora_engine_handover")), backups if backups in BACKUPS else "host memory",
                   bool(get("lora_engine_force_foreign")), max_strength)


def a1111_folders(cmd_opts, models_path: str | None) -> list[str]:
    """A1111's LoRA folders: ``--lora-dir`` (default models/Lora) and ``--lyco-dir-backcompat``."""
    out = []
    for attr, sub in (("lora_dir", "Lora"), ("lyco_dir_backcompat", "LyCORIS")):
        path = getattr(cmd_opts, attr, None) or (os.path.join(models_path, sub) if models_path else None)
        if path and path not in out:
            out.append(path)
    return out


def register() -> None:
    """``on_ui_settings`` callback: add every option to A1111's settings (A1111 only)."""
    import gradio as gr
    from modules import shared

    section = SECTION
    for o in OPTIONS:
        args = {}
        component = None
        if o.kind == "radio":
            component, args = gr.Radio, {"choices": list(o.choices)}
        elif o.kind == "slider":
            component, args = gr.Slider, {"minimum": o.choices[0], "maximum": o.choices[1], "step": o.choices[2]}
        elif o.kind == "number":
            component = gr.Number
        info = shared.OptionInfo(o.default, o.label, component, args, section=section)
        if o.info:
            info = info.info(o.info)
        shared.opts.add_option(o.key, info)
