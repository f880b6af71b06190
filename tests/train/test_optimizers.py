"""Optional optimisers: exact resume with Prodigy / Lion state (when installed); a clear line when missing."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from lora_engine.errors import TrainingError
from lora_engine.train import Trainer, build_config
from tests.train.models import make_dataset, tiny_parts


def _cfg(tmp_path, name, optimizer, **kw):
    data = str(tmp_path / "data")
    make_dataset(data, 2)
    return build_config(dict(data_dir=data, output=str(tmp_path / name / "o.safetensors"), resolution=32,
                             bucket_step=8, steps=4, rank=2, alpha=2, optimizer=optimizer, unet_lr=1.0
                             if optimizer == "prodigy" else 1e-3, save_precision="fp32", dropout=0.1) | kw)


@pytest.mark.parametrize("optimizer,module", [("prodigy", "prodigyopt"), ("lion", "lion_pytorch")])
def test_optional_optimizer_resumes_exactly(tmp_path, optimizer, module):
    pytest.importorskip(module)
    full = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "full", optimizer)).run()
    holder = {}
    holder["t"] = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "cut", optimizer),
                          progress=lambda p: p.step == 2 and holder["t"].cancel())
    cut = holder["t"].run()
    resumed = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "cut", optimizer)).run(resume=cut.state_path)
    assert resumed.losses == full.losses
    a, b = load_file(full.output), load_file(resumed.output)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_missing_optimizer_package_is_one_clear_line(tmp_path):
    with pytest.raises(TrainingError, match=r"optimizer AdamW8bit needs the package bitsandbytes \(pip install"):
        Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "x", "AdamW8bit"))
