"""Optional optimisers: exact resume with Prodigy / Lion state (when installed); a clear line when missing."""
from __future__ import annotations

import sys
import math

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


def test_missing_optimizer_package_is_one_clear_line(tmp_path, monkeypatch):
    # a machine without bitsandbytes, whether or not this one has it (None in sys.modules stops the import)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(TrainingError, match=r"optimizer AdamW8bit needs the package bitsandbytes \(pip install"):
        Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "x", "AdamW8bit"))


def test_adamw8bit_trains_and_resumes_exactly_on_cpu(tmp_path):
    """bitsandbytes' AdamW8bit on CPU tensors: 8-bit moments (``min_8bit_size`` low enough for the tiny
    LoRA's matrices; the small ones keep 32-bit state, as in bitsandbytes), the LoRA moves off its zero
    ``up`` init, the file loads, and the resume state (whose quantisation maps bitsandbytes shares across
    parameters) gives the uninterrupted run bit for bit."""
    pytest.importorskip("bitsandbytes")
    from lora_engine.formats import load_lora
    from lora_engine.train.optim import available

    assert "adamw8bit" in available()
    args = {"optimizer_args": {"min_8bit_size": 64}}
    full = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "full", "adamw8bit", **args))
    assert type(full.optimizer).__name__ == "AdamW8bit"
    full_result = full.run()
    moments = [s["state1"].dtype for s in full.optimizer.state.values()]
    assert torch.uint8 in moments and torch.float32 in moments
    assert len(full_result.losses) == 4 and all(math.isfinite(v) for v in full_result.losses)
    saved = load_file(full_result.output)
    ups = [t for k, t in saved.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(t).all() for t in ups) and all(torch.count_nonzero(t) for t in ups)
    assert load_lora(full_result.output).modules.keys() == {k.split(".")[0] for k in saved}

    holder = {}
    holder["t"] = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "cut", "adamw8bit", **args),
                          progress=lambda p: p.step == 2 and holder["t"].cancel())
    cut = holder["t"].run()
    assert cut.cancelled and cut.steps == 2
    resumed = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "cut", "adamw8bit", **args)).run(
        resume=cut.state_path)
    assert resumed.losses == full_result.losses
    b = load_file(resumed.output)
    assert all(torch.equal(saved[k], b[k]) for k in saved)
