"""Exact resume (losses and final weights bit for bit), cancellation, NaN guard, bad datasets."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from lora_engine.errors import DatasetError, TrainingError
from lora_engine.train import Trainer, build_config
from tests.train.models import make_dataset, square_image, tiny_parts

RANDOM_EVERYTHING = dict(resolution=32, bucket_step=8, batch_size=2, unet_lr=5e-3, te_lr=1e-3, rank=4, alpha=4,
                         train_text_encoder=True, dropout=0.1, rank_dropout=0.2, module_dropout=0.1, flip=True,
                         shuffle=True, keep_tokens=1, tag_dropout=0.2, dropout_every_n_epochs=0, noise_offset=0.05,
                         save_precision="fp32", seed=11, scheduler="cosine_with_restarts", num_cycles=2,
                         grad_accum=2, min_snr_gamma=5.0, steps=6)


def _cfg(tmp_path, name, **kw):
    data = str(tmp_path / "data")
    if not os.path.isdir(data):
        make_dataset(data, 3, sub="2_sks square")
        make_dataset(data, 2, size=(48, 32))
    return build_config(dict(RANDOM_EVERYTHING, data_dir=data, output=str(tmp_path / name / "lora.safetensors"), **kw))


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path):
    full = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "full")).run()
    assert len(full.losses) == 6 and all(torch.isfinite(torch.tensor(full.losses)))

    part_cfg = _cfg(tmp_path, "part")
    holder = {}

    def stop_at_3(p):
        if p.step == 3:
            holder["t"].cancel()

    holder["t"] = Trainer(tiny_parts(str(tmp_path)).host(), part_cfg, progress=stop_at_3)
    cut = holder["t"].run()
    assert cut.cancelled and cut.steps == 3 and os.path.isfile(cut.output) and cut.state_path
    assert cut.losses == full.losses[:3]

    resumed = Trainer(tiny_parts(str(tmp_path)).host(), part_cfg).run(resume=cut.state_path)
    assert resumed.steps == 6 and not resumed.cancelled
    assert resumed.losses == full.losses  # exact float equality, every step
    a, b = load_file(full.output), load_file(resumed.output)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_settings(tmp_path):
    cut = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "a", steps=1)).run()
    other = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "a", steps=2, rank=2))
    with pytest.raises(TrainingError, match="does not match this network"):
        other.run(resume=cut.state_path)
    other = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "a", steps=2, seed=5))
    with pytest.raises(TrainingError, match="'seed' differs"):
        other.run(resume=cut.state_path)


def test_nan_guard_skips_then_stops_with_clear_message(tmp_path):
    host = tiny_parts(str(tmp_path)).host()
    real = host.denoise
    calls = {"n": 0}

    def poisoned(x, t, cond, sizes):
        calls["n"] += 1
        out = real(x, t, cond, sizes)
        return out * float("nan") if calls["n"] > 3 else out  # 1 calibration + 2 good steps, then NaN

    host.denoise = poisoned
    logs = []
    trainer = Trainer(host, _cfg(tmp_path, "nan", grad_accum=1, steps=10, max_bad_steps=3), log=logs.append)
    with pytest.raises(TrainingError, match="3 steps in a row gave NaN/Inf"):
        trainer.run()
    assert trainer.step == 4 and trainer.skipped == 3
    assert [x != x for x in trainer.losses] == [False, False, True, True]  # NaN recorded for skipped steps
    assert sum("step skipped" in line for line in logs) == 3
    saved = load_file(trainer.cfg.output)  # the last good weights are saved before stopping
    assert all(torch.isfinite(v).all() for v in saved.values())
    for k, v in trainer.network.kohya_state_dict().items():
        assert torch.equal(saved[k], v)


def _expect(tmp_path, match, **kw):
    progress = []
    parts = tiny_parts(str(tmp_path))
    cfg = build_config(dict(resolution=32, bucket_step=8, steps=1, output=str(tmp_path / "o.safetensors"), **kw))
    with pytest.raises(DatasetError, match=match):
        Trainer(parts.host(), cfg, progress=progress.append)
    assert progress == [] and not os.path.exists(tmp_path / "o.safetensors")


def test_bad_datasets_fail_before_any_step(tmp_path):
    _expect(tmp_path, "dataset folder does not exist", data_dir=str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    _expect(tmp_path, r"empty: no images found", data_dir=str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (broken / "bad.txt").write_text("red square")
    _expect(tmp_path, r"none of the 1 images could be read \(first: bad.png: cannot read image", data_dir=str(broken))
    nocap = make_dataset(str(tmp_path / "nocap"), 2, captions=False)
    _expect(tmp_path, "no captions: none of the 2 images has a .txt/.caption file", data_dir=nocap)
    small = make_dataset(str(tmp_path / "small"), 2, size=(20, 20))
    _expect(tmp_path, r"img0.png: image 20x20 is smaller than its bucket 32x32", data_dir=small)


def test_report_lists_skipped_and_missing_before_training(tmp_path):
    data = make_dataset(str(tmp_path / "d"), 2, sub="3_sks")
    square_image(str(tmp_path / "d" / "3_sks" / "nocap.png"), "red", "blue")
    (tmp_path / "d" / "3_sks" / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = build_config(dict(data_dir=data, resolution=32, bucket_step=8, batch_size=2, epochs=2,
                            output=str(tmp_path / "o.safetensors")))
    trainer = Trainer(tiny_parts(str(tmp_path)).host(), cfg)
    rep = trainer.report
    assert rep.images == 3 and rep.samples == 9 and rep.folders == {"3_sks": {"n_repeats": 3, "img_count": 3}}
    assert len(rep.skipped) == 1 and rep.skipped[0].startswith(os.path.join("3_sks", "broken.jpg") + ": cannot read")
    assert rep.missing_captions == [os.path.join("3_sks", "nocap.png")]
    assert trainer.dataset.items[2].caption == "sks"  # folder class tokens stand in
    assert rep.buckets == {(32, 32): 9} and rep.batches_per_epoch == 5 and rep.total_steps == 10
    text = "\n".join(rep.lines())
    assert "skipped 3_sks/broken.jpg" in text and "buckets: 32x32: 9" in text and "10 steps" in text


class _Crash(Exception):
    pass


def test_crash_after_periodic_save_resumes_exactly(tmp_path):
    """A run killed mid-way (no cancel, no final save) resumes from its last periodic save, exactly."""
    kw = dict(grad_accum=1, steps=5, save_every_steps=2, keep_intermediate=True)
    full = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "full", **kw)).run()

    def crash(p):
        if p.step == 3:
            raise _Crash()

    cfg = _cfg(tmp_path, "crash", **kw)
    with pytest.raises(_Crash):
        Trainer(tiny_parts(str(tmp_path)).host(), cfg, progress=crash).run()
    folder = os.path.dirname(cfg.output)
    assert sorted(os.listdir(folder)) == ["lora-step000002.safetensors", "lora.safetensors",
                                          "lora.safetensors.trainstate"]
    resumed = Trainer(tiny_parts(str(tmp_path)).host(), cfg).run(resume=cfg.output + ".trainstate")
    assert resumed.losses == full.losses
    a, b = load_file(full.output), load_file(resumed.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
