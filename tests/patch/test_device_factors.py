"""LoRA tensors on the model's device: moved once per LoRA while it is in the stack, then dropped.

The ``meta`` device stands in for a GPU here (CI has none): tensors there have shapes and dtypes and
every op runs, without values. A model moved to ``meta`` goes through exactly the code a CUDA model does
(merged writes with backups on the weight's device, on-the-fly side paths), so these tests check that
the writes and side paths use the device copies, that each adapter is copied once and not at every
change, and that a LoRA leaving the stack leaves the device. The values on a real device are the CPU
values (the tensors are copied, not converted): the numerics tests run on the CPU."""
from __future__ import annotations

import torch

from lora_engine.adapters.dora import DoRA
from lora_engine.adapters.lora import LoRA
from lora_engine.library.parsed import LoraCache
from lora_engine.engine import LoraEngine, Mode
from lora_engine.patch import StackEntry
from lora_engine.patch.device_factors import DeviceFactors
from tests.patch.conftest import make_host
from tests.fixtures.files.kohya import write_kohya

META = torch.device("meta")


def _lora(seed: int) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA(down=torch.randn(4, 16, generator=g).half(), up=torch.randn(8, 4, generator=g).half(), scale=0.5)


def test_cpu_weights_use_the_adapter_itself():
    a = _lora(0)
    assert DeviceFactors().get(a, torch.device("cpu")) is a


def test_one_copy_per_adapter_and_device_dtypes_kept_nested_moved():
    cache, a = DeviceFactors(), _lora(0)
    c = cache.get(a, META)
    assert c is not a and c.down.device == META and c.up.dtype == torch.float16 and c.scale == 0.5
    assert cache.get(a, META) is c and len(cache) == 1
    assert cache.get(c, META) is c  # already there: nothing copied
    d = DoRA(inner=_lora(1), magnitude=torch.ones(8))
    dc = cache.get(d, META)
    assert dc.magnitude.device == META and dc.inner.down.device == META
    assert cache.nbytes == (4 * 16 + 8 * 4) * 2 * 2 + 8 * 4


def test_retain_drops_what_left_the_stack():
    cache, a, b = DeviceFactors(), _lora(0), _lora(1)
    cache.get(a, META), cache.get(b, META)
    assert cache.retain([b]) == 1 and len(cache) == 1
    assert cache.get(b, META).down.device == META and len(cache) == 1


def _meta_engine(tmp_path, mode):
    _, root, km = make_host("sd1", "diffusers")
    for i in range(2):
        write_kohya(tmp_path / f"l{i}.safetensors", km, seed=i + 1)
    cache = LoraCache()
    files = [cache.get(tmp_path / f"l{i}.safetensors") for i in range(2)]
    root.to(META)
    return LoraEngine(root, km, mode, backup_device="same"), files


def _moves(monkeypatch):
    """Count adapter copies to the device (``on_device`` calls)."""
    from lora_engine.patch import device_factors
    calls = []
    real = device_factors.on_device
    monkeypatch.setattr(device_factors, "on_device", lambda a, d: calls.append(d) or real(a, d))
    return calls


def test_merged_moves_each_adapter_once_and_drops_it_when_its_lora_leaves(tmp_path, monkeypatch):
    eng, (a, b) = _meta_engine(tmp_path, Mode.MERGED)
    moves = _moves(monkeypatch)
    eng.set_stack([StackEntry(a, te=1.0, unet=1.0), StackEntry(b, te=0.5, unet=0.5)])
    n_modules = len(a.modules) + len(b.modules)
    cached = eng._patcher.adapters_on_device
    assert len(moves) == len(cached) == n_modules and set(moves) == {META}
    eng.set_stack([StackEntry(a, te=0.3, unet=0.3), StackEntry(b, te=0.5, unet=0.5)])  # a change: no new copy
    assert len(moves) == n_modules and eng.stats.slots_written > 0
    eng.set_stack([StackEntry(b, te=0.5, unet=0.5)])
    assert len(cached) == len(b.modules)
    eng.restore()
    assert len(cached) == 0


def test_onthefly_side_paths_use_device_copies_and_drop_them(tmp_path, monkeypatch):
    eng, (a, b) = _meta_engine(tmp_path, Mode.ONTHEFLY)
    moves = _moves(monkeypatch)
    root = eng.root
    eng.set_stack([StackEntry(a, te=1.0, unet=0.8)])
    layer = next(p for p, m in root.named_modules() if isinstance(m, torch.nn.Linear)
                 and p.startswith("unet.") and "attn1.to_q" in p)
    x = torch.empty(1, 5, root.get_submodule(layer).in_features, device=META)
    assert root.get_submodule(layer)(x).device == META  # the hook ran on the device, with device factors
    assert len(moves) >= 1 and len(eng._patcher.adapters_on_device) == len(moves)
    eng.set_stack([StackEntry(b, te=1.0, unet=0.8)])
    assert len(eng._patcher.adapters_on_device) == 0  # a's copies left with a
    eng.restore()
