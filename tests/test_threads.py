"""The CPU thread policy every long command uses (``lora_engine.apps.threads``) and its ``--threads`` option."""
from __future__ import annotations

import os

import pytest
import torch

from lora_engine.apps import threads
from lora_engine.apps.cli import build_parser


@pytest.fixture
def machine(monkeypatch):
    """A machine of ``cores`` usable cores (``online`` CPUs) with a given 1-minute load; no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_(cores: int, online: int, load: float):
        monkeypatch.setattr(threads, "usable_cores", lambda: cores)
        monkeypatch.setattr(os, "cpu_count", lambda: online)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    return set_


@pytest.mark.parametrize("cores,online,load,expected", [
    (2, 2, 0.1, 2),   # idle: every physical core
    (2, 2, 0.6, 1),   # another process keeps most of a core busy
    (2, 2, 4.7, 1),   # busy shared machine (what torch's default oversubscribed 66x)
    (8, 16, 4.0, 8),  # hyper-threads and a quota: the physical cores cap it
    (8, 8, 3.4, 5),
])
def test_default_leaves_busy_cores_alone(machine, cores, online, load, expected):
    machine(cores, online, load)
    choice = threads.choose_threads(None)
    assert choice.threads == expected and f"load {load:.1f}" in choice.reason


def test_explicit_settings_win_and_small_models_get_one(machine, monkeypatch):
    machine(8, 8, 0.0)
    assert threads.choose_threads(None, small_model=True).threads == 1
    assert threads.choose_threads(3, small_model=True) == threads.ThreadChoice(3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads(None) == threads.ThreadChoice(2, "OMP_NUM_THREADS")
    assert threads.choose_threads(5).threads == 5


def test_usable_cores_counts_physical_cores_of_this_process():
    n = threads.usable_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with threads.torch_threads(threads.ThreadChoice(before + 1, "test")):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_every_long_command_has_threads():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    with_option = {name for name, p in sub.choices.items() if any(a.dest == "threads" for a in p._actions)}
    assert with_option == {"train", "generate", "demo", "serve", "merge", "resize", "extract", "bake"}
    demo = build_parser().parse_args(["generate", "demo", "x"])
    other = build_parser().parse_args(["generate", "models/sd15", "x"])
    assert demo.small_model(demo) and not other.small_model(other)
