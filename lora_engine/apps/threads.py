"""How many CPU threads torch uses for a command (``--threads N`` on every long command and ``serve``).

Torch's default is one OpenMP thread per core, each spinning at every parallel region until all arrive.
When other processes already keep those cores busy, a thread that is not scheduled stalls all the others:
on a shared 2-core machine training ran 66x slower with the default than with one thread. So:

- ``--threads N`` wins, then ``OMP_NUM_THREADS`` when it is set (the user's explicit choice);
- else the physical cores this process may use (affinity and a cgroup CPU quota) that other processes do
  not keep busy: ``round(online CPUs - 1-minute load average)``, capped by those cores, and at least 1.
  A busy machine therefore gets 1 thread;
- small models (the demo model: 32x32 pixels, a few MB of weights) get 1: their operations are too small
  to split, and every extra thread only adds synchronisation.

Oversubscribing costs far more than leaving a core idle (66x against at most the core count), so the
rule leans to fewer threads.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # one line, for logs and the bench


def _cpu_ids() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _physical(cpus: list[int]) -> int:
    """Distinct (package, core) pairs among ``cpus``; hyper-threads of one core count once."""
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "physical_package_id") as a, open(base + "core_id") as b:
                cores.add((a.read().strip(), b.read().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def _quota() -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, else v1 ``cfs_quota_us``), None when unlimited."""
    v2 = _read("/sys/fs/cgroup/cpu.max")  # "max 100000" or "200000 100000"
    if v2:
        quota, period = (v2.split() + ["100000"])[:2]
    else:
        quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    try:
        q, p = int(quota), int(period or 100000)
    except (TypeError, ValueError):  # "max", or no cgroup files
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def usable_cores() -> int:
    """Physical cores this process may run on (affinity, hyper-threads folded, cgroup quota)."""
    cores = _physical(_cpu_ids())
    quota = _quota()
    return max(1, min(cores, int(quota)) if quota else cores)  # a 1.5-CPU quota: 1 thread


def default_threads(small_model: bool = False) -> ThreadChoice:
    """The policy above, without ``--threads``/``OMP_NUM_THREADS``."""
    if small_model:
        return ThreadChoice(1, "small model")
    cores, online = usable_cores(), os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ThreadChoice(cores, f"{cores} usable cores")
    free = int(online - load + 0.5)
    n = max(1, min(cores, free))
    busy = "busy" if n < cores else "idle"
    return ThreadChoice(n, f"{cores} usable cores, load {load:.1f} on {online} CPUs ({busy})")


def choose_threads(requested: int | None, small_model: bool = False) -> ThreadChoice:
    if requested is not None:
        return ThreadChoice(max(1, requested), "--threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), "OMP_NUM_THREADS")
    return default_threads(small_model)


@contextlib.contextmanager
def torch_threads(choice: ThreadChoice):
    """Run the block with ``choice.threads`` intra-op threads; the previous count comes back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    try:
        yield choice
    finally:
        torch.set_num_threads(before)
