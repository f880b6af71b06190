"""In-process LoRA training on the model the host already has loaded.

``TrainHost`` (host.py) is all a host provides; ``diffusers_host`` builds one from diffusers parts.
``Trainer`` validates the dataset on construction, then ``run()`` trains, saves kohya files and a
resume state; ``TrainingJob`` (job.py) runs it on a thread for UIs.
"""
from .config import TrainConfig, build_config, load_toml
from .dataset import DatasetConfig, DatasetReport
from .captions import CaptionOptions
from .host import Cond, TrainHost
from .network import NetworkConfig, TrainNetwork
from .trainer import Progress, Trainer, TrainResult

__all__ = ["TrainConfig", "build_config", "load_toml", "DatasetConfig", "DatasetReport", "CaptionOptions", "Cond",
           "TrainHost", "NetworkConfig", "TrainNetwork", "Progress", "Trainer", "TrainResult"]
