"""The engine on a CUDA model (skipped without a GPU; ``bench/gpu_check.sh`` runs these first on a lent
GPU machine): merged weights equal the independent sum, restore is bit-exact after random switches with
backups on the CPU and on the GPU, on the fly equals merged, the LoRA tensors live on the GPU while in the
stack and leave with their LoRA, and the CUDA merge gives the CPU merge's values."""
from __future__ import annotations

import random

import pytest
import torch

from lora_engine.library.parsed import LoraCache
from lora_engine.engine import LoraEngine, Mode
from lora_engine.patch import StackEntry
from tests.patch.conftest import make_host
from tests.fixtures.files.kohya import independent_delta, write_kohya

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _host(tmp_path, arch="sd1", naming="diffusers", n=2, dtype=torch.float32):
    m, root, km = make_host(arch, naming)
    truths = [write_kohya(tmp_path / f"l{i}.safetensors", km, seed=7 + i, fraction=0.6, dtype=torch.float16)
              for i in range(n)]
    cache = LoraCache()
    files = [cache.get(tmp_path / f"l{i}.safetensors") for i in range(n)]
    root.to(CUDA, dtype)
    return m, root, km, files, truths


@pytest.mark.parametrize("backup", ["cpu", "same"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_merged_equals_sum_and_restores_bit_exactly(tmp_path, backup, dtype):
    _, root, km, files, truths = _host(tmp_path, "sd2", "a1111", dtype=dtype)
    before = {k: v.detach().clone() for k, v in root.state_dict().items()}
    eng = LoraEngine(root, km, Mode.MERGED, backup_device=backup)
    eng.set_stack([StackEntry(files[0], te=0.7, unet=-0.4), StackEntry(files[1], te=1.3, unet=0.9)])
    factors = eng._patcher.adapters_on_device
    assert len(factors) == sum(len(f.modules) for f in files)
    assert all(b[0].device.type == ("cpu" if backup == "cpu" else "cuda") for b in eng._patcher.backups.values())
    expected = {}
    for truth, te, unet in zip(truths, (0.7, 1.3), (-0.4, 0.9)):
        for name, (down, up, alpha) in truth.items():
            t = km.lookup(name)
            w0 = before[t.weight_key] if t.rows is None else before[t.weight_key][t.rows[0]:t.rows[1]]
            m = te if t.component == "te" else unet
            key = (t.weight_key, t.rows)
            expected[key] = expected.get(key, w0.double().cpu()) + m * independent_delta(down, up, alpha, w0.shape)
    tol = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}[dtype]
    for (key, rows), want in expected.items():
        p = root.get_parameter(key)
        got = p if rows is None else p[rows[0]:rows[1]]
        torch.testing.assert_close(got.double().cpu(), want.to(dtype).double(), rtol=tol[0], atol=tol[1], msg=key)
    rnd = random.Random(0)
    for _ in range(100):
        eng.set_stack([StackEntry(f, te=rnd.uniform(-2, 2), unet=rnd.uniform(-2, 2)) for f in files
                       if rnd.random() < 0.7])
    eng.restore()
    assert len(factors) == 0
    for k, v in root.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.ndim else v, before[k].view(torch.uint8) if v.ndim else before[k]), k


def test_cuda_merge_gives_the_cpu_values(tmp_path):
    m, root, km, files, _ = _host(tmp_path, n=2)
    stack = [StackEntry(files[0], te=0.8, unet=0.6), StackEntry(files[1], te=-0.5, unet=1.2)]
    LoraEngine(root, km).set_stack(stack)
    on_gpu = {k: v.detach().cpu() for k, v in root.state_dict().items()}
    _, cpu_root, cpu_km = make_host("sd1", "diffusers")
    LoraEngine(cpu_root, cpu_km).set_stack(stack)
    for k, v in cpu_root.state_dict().items():
        torch.testing.assert_close(on_gpu[k], v, rtol=2e-6, atol=2e-7, msg=k)  # GEMM order only


def test_cuda_onthefly_equals_merged_and_keeps_weights(tmp_path):
    m, root, km, files, _ = _host(tmp_path, n=2)
    before = {k: v.detach().clone() for k, v in root.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    cfg = m.unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g).to(CUDA)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g).to(CUDA)

    @torch.no_grad()
    def out():
        return m.unet(x, torch.tensor([10, 10], device=CUDA), ctx).sample

    base = out()
    eng = LoraEngine(root, km, Mode.MERGED)
    stack = [StackEntry(files[0], unet=0.8), StackEntry(files[1], unet=-0.6)]
    eng.set_stack(stack)
    merged = out()
    eng.set_mode(Mode.ONTHEFLY)
    fly = out()
    for k, v in root.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert (merged - base).abs().max() > 1e-3
    torch.testing.assert_close(fly, merged, rtol=1e-4, atol=1e-4)
    assert len(eng._patcher.adapters_on_device) > 0
    eng.set_factor(files[0].path, torch.tensor([1.0, 0.0], device=CUDA))  # per sample, on the device
    eng.set_factor(files[1].path, torch.tensor([1.0, 0.0], device=CUDA))
    mixed = out()
    torch.testing.assert_close(mixed[0], merged[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-4, atol=1e-4)
    eng.restore()
    assert len(eng._patcher.adapters_on_device) == 0
    torch.testing.assert_close(out(), base, rtol=0, atol=0)
