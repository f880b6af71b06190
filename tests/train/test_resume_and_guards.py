"""Exact resume (losses and final weights bit for bit), cancellation, NaN guard, bad datasets."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from lora_engine.errors import DatasetError, TrainingError
from lora_engine.formats import load_lora
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
    logs, after = [], {}

    def record(p):
        after[p.step] = {k: v.clone() for k, v in trainer.network.kohya_state_dict().items()}

    trainer = Trainer(host, _cfg(tmp_path, "nan", grad_accum=1, steps=10, max_bad_steps=3), progress=record,
                      log=logs.append)
    with pytest.raises(TrainingError, match=r"steps 3-5 gave NaN/Inf \(last loss nan\); stopped after step 5; saved "
                       r".*lora.safetensors with the weights after step 1, the last whose next step was finite"):
        trainer.run()
    assert sum("step skipped" in line for line in logs) == 3
    assert [line for line in logs if "step skipped" in line][0].startswith("step 3:")
    assert "rolled back to the weights after step 1 (the last whose next step was finite)" in logs
    assert logs[-1].endswith("lora.safetensors at step 1")
    # step 2 started from the weights after step 1 and was finite; step 3 started from step 2's weights and was
    # NaN, so those are not trusted: the file holds the weights after step 1, and says so
    assert trainer.step == 1 and trainer.skipped == 0 and len(trainer.losses) == 1
    saved = load_file(trainer.cfg.output)
    assert set(saved) == set(after[1]) and all(torch.equal(saved[k], after[1][k]) for k in saved)
    assert not all(torch.equal(saved[k], after[2][k]) for k in saved)
    assert load_lora(trainer.cfg.output).metadata["ss_steps"] == "1"


def _boom(tmp_path, name, **kw):
    """Settings whose learning rate explodes: the first step is finite and throws the weights to ~1e6, every
    step after it is NaN."""
    return _cfg(tmp_path, name, **dict(dict(grad_accum=1, steps=10, save_every_steps=1, unet_lr=1e6, te_lr=1e6,
                                            scheduler="constant", max_bad_steps=3), **kw))


def test_exploding_learning_rate_saves_the_last_good_state(tmp_path):
    """A run resumed with lr = 1e6: step 3 is finite and applied (weights ~1e6, finite in fp32, Inf in fp16),
    steps 4-6 are NaN. The LoRA left on disk is the state after step 2, bit for bit, finite, with its step
    count; the fp32 weights of step 3 were never written, not even by the periodic save."""
    good = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "boom", grad_accum=1, steps=2)).run()
    before = load_file(good.output)
    logs = []
    trainer = Trainer(tiny_parts(str(tmp_path)).host(), _boom(tmp_path, "boom", save_precision="fp32"), log=logs.append)
    with pytest.raises(TrainingError, match=r"steps 4-6 gave NaN/Inf .* nothing saved: the last good weights are the "
                       r"ones resumed from step 2; .*lora.safetensors left as it was"):
        trainer.run(resume=good.state_path)
    assert not any(line.startswith("saved ") for line in logs), logs  # step 3's weights were never proven
    after = load_file(good.output)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in after.values())



def test_exploding_learning_rate_never_replaces_a_good_file(tmp_path):
    """A fresh run with lr = 1e6 over the output of an earlier good run: its only finite step started from the
    untrained weights, so nothing is written (the step-1 weights are Inf in fp16 and were never proven); the
    earlier file stays byte for byte. A run that ends right after such a step refuses to write Inf."""
    good = Trainer(tiny_parts(str(tmp_path)).host(), _cfg(tmp_path, "boom", grad_accum=1, steps=2)).run()
    with open(good.output, "rb") as fh:
        before = fh.read()
    logs = []
    trainer = Trainer(tiny_parts(str(tmp_path)).host(), _boom(tmp_path, "boom", save_precision="fp16"),
                      log=logs.append)
    with pytest.raises(TrainingError, match=r"steps 2-4 gave NaN/Inf .* nothing saved: the last good weights are "
                       r"the untrained ones; .*lora.safetensors left as it was"):
        trainer.run()
    with open(good.output, "rb") as fh:
        assert fh.read() == before
    assert "rolled back to the weights after step 0 (the last whose next step was finite)" in logs

    one = Trainer(tiny_parts(str(tmp_path)).host(), _boom(tmp_path, "one", steps=1, save_precision="fp16"))
    with pytest.raises(TrainingError, match=r"one.lora.safetensors not saved at step 1: .* is NaN/Inf in fp16 "
                       r"\(largest fp32 weight .*e\+0[5-9]\); lower the learning rate or use save_precision = fp32"):
        one.run()
    assert not os.path.exists(one.cfg.output)


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


def _undecodable_png(path: str) -> None:
    """A PNG whose chunk checksums are right (``Image.verify`` passes) but whose pixel data does not inflate."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    i = data.index(b"IDAT")
    (n,) = struct.unpack(">I", data[i - 4:i])
    payload = bytes(data[i + 4:i + 6]) + bytes(n - 2)  # the zlib header, then zeros
    data[i + 4:i + 4 + n] = payload
    data[i + 4 + n:i + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + payload))
    with open(path, "wb") as fh:
        fh.write(data)
    with Image.open(path) as im:
        im.verify()


def test_image_that_passes_verify_but_does_not_decode_is_skipped(tmp_path):
    data = make_dataset(str(tmp_path / "d"), 2)
    _undecodable_png(os.path.join(data, "zz_broken.png"))
    (tmp_path / "d" / "zz_broken.txt").write_text("red square")
    (tmp_path / "d" / "also_bad.jpg").write_bytes(b"not a jpeg")
    cfg = build_config(dict(data_dir=data, resolution=32, bucket_step=8, steps=2, batch_size=3,
                            output=str(tmp_path / "o.safetensors")))
    trainer = Trainer(tiny_parts(str(tmp_path)).host(), cfg)
    assert trainer.report.images == 2
    assert [s.split(":")[0] for s in trainer.report.skipped] == ["also_bad.jpg", "zz_broken.png"]
    assert all("cannot read image" in s and "\n" not in s for s in trainer.report.skipped)
    assert trainer.run().steps == 2  # the broken file never reaches a batch


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
