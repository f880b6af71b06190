"""Training settings: one frozen value, loadable from TOML (flat keys, or [network]/[dataset]/[captions]
tables) with command-line overrides on top."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..errors import TrainingError
from .captions import CaptionOptions
from .dataset import DatasetConfig
from .network import NetworkConfig


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str = ""
    output: str = ""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    steps: int = 0  # 0: from epochs
    epochs: int = 1
    grad_accum: int = 1
    unet_lr: float = 1e-4
    te_lr: float = 5e-5
    optimizer: str = "adamw"
    optimizer_args: dict = field(default_factory=dict)
    weight_decay: float = 0.01
    scheduler: str = "constant"
    warmup_steps: int = 0
    num_cycles: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 with loss scaling, CUDA only)
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    min_timestep: int = 0
    max_timestep: int = 0  # 0: len(alphas_cumprod)
    seed: int = 42
    cache_latents: bool = True
    cache_text: bool = True  # only used when the text encoder is frozen
    save_every_steps: int = 0
    save_every_epochs: int = 0
    keep_intermediate: bool = False
    save_precision: str = "fp16"  # fp32 | fp16 | bf16
    save_state: bool = True
    sample_every_steps: int = 0
    sample_prompts: tuple = ()
    max_bad_steps: int = 3  # consecutive non-finite steps before stopping
    output_name: str = ""
    comment: str = ""

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"network": NetworkConfig, "dataset": DatasetConfig, "captions": CaptionOptions}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _coerce(cls, key: str, value):
    """TOML/CLI values to the field's type (``alpha = 8`` is a float, ``rank = "4"`` an int)."""
    default = getattr(cls(), key)
    kind = type(default)
    if kind is bool and not isinstance(value, bool):
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise TrainingError(f"setting {key!r} must be true or false, not {value!r}")
    if kind in (int, float, str) and not isinstance(value, kind):
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise TrainingError(f"setting {key!r} must be a {kind.__name__}, not {value!r}") from None
    return value


def _route(flat: dict) -> dict[str, dict]:
    """Split flat settings into {section: {field: value}}; unknown keys fail with their name."""
    out: dict[str, dict] = {"train": {}, "network": {}, "dataset": {}, "captions": {}}
    train_fields = _fields(TrainConfig) - set(_SECTIONS)
    for key, value in flat.items():
        for section, cls in (("train", None), *_SECTIONS.items()):
            names = train_fields if cls is None else _fields(cls) - {"captions"}
            if key in names:
                out[section][key] = _coerce(cls or TrainConfig, key, value)
                break
        else:
            raise TrainingError(f"unknown training setting {key!r}")
    return out


def build_config(settings: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Settings (flat and/or with [network]/[dataset]/[captions] tables) applied over ``base``."""
    flat: dict = {}
    for key, value in settings.items():
        if key in _SECTIONS and isinstance(value, dict):
            flat.update(value)
        elif value is not None:
            flat[key] = value
    parts = _route(flat)
    base = base or TrainConfig()
    captions = dataclasses.replace(base.dataset.captions, **parts["captions"])
    dataset = dataclasses.replace(base.dataset, captions=captions, **parts["dataset"])
    network = dataclasses.replace(base.network, **parts["network"])
    train = parts["train"]
    if "sample_prompts" in train:
        train["sample_prompts"] = tuple(train["sample_prompts"])
    return dataclasses.replace(base, network=network, dataset=dataset, **train)


def load_toml(path: str | os.PathLike) -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        raise TrainingError(f"{os.fspath(path)}: cannot read config ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainingError(f"{os.fspath(path)}: invalid TOML ({e})") from None
