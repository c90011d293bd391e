"""Thread counts chosen from the cores this process may really use (affinity and cgroup CPU quota), and the
OpenMP wait policy, which must be in the environment before torch is first imported.

Why: PyTorch sizes its intra-op pool to the machine's cores and its OpenMP threads spin while they wait. With
decode threads (or other processes) on the same cores, the spinning threads steal the cores the others need
and throughput collapses (measured: 5-10x slower inference with 2 threads than with 1 on a busy 2-core host).
A passive wait policy and an intra-op pool that leaves room for decoding avoid it. No torch import here.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TypeVar

from imgpipe import defaults

T = TypeVar("T")

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_v2(proc_cgroup: str | None) -> str:
    """The cgroup v2 path of this process ("0::/path" in /proc/self/cgroup); "/" when unknown."""
    for line in (proc_cgroup or "").splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return "/"


def _cgroup_v2_files(root: Path, proc_cgroup: str | None, name: str) -> list[str]:
    """The text of cgroup v2 file ``name`` in this process's cgroup and each one above it, up to the root."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup"))
    texts: list[str] = []
    here = root / _own_cgroup_v2(proc_cgroup).lstrip("/")
    while True:
        text = _read(here / name)
        if text:
            texts.append(text)
        if here == root or root not in here.parents:
            return texts
        here = here.parent


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """CPUs allowed by the cgroup CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``),
    the tightest along the way from this process's cgroup to the root; None when there is no quota.

    ``root`` and ``proc_cgroup`` (the text of /proc/self/cgroup) are parameters so the parsing can be tested.
    """
    limits: list[float] = []
    if (root / "cgroup.controllers").exists():  # v2: walk from our cgroup up to the mount root
        for text in _cgroup_v2_files(root, proc_cgroup, "cpu.max"):
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                limits.append(int(quota) / int(period))
    else:  # v1
        for folder in ("cpu,cpuacct", "cpu"):
            quota_text, period_text = (
                _read(root / folder / "cpu.cfs_quota_us"),
                _read(root / folder / "cpu.cfs_period_us"),
            )
            if quota_text and period_text and int(quota_text) > 0 and int(period_text) > 0:
                limits.append(int(quota_text) / int(period_text))
                break
    return min(limits) if limits else None


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int | None:
    """Bytes allowed by the cgroup memory limit (v2 ``memory.max``, the tightest up to the root; v1
    ``memory.limit_in_bytes``, where "no limit" reads as a huge number); None when there is none."""
    limits: list[int] = []
    if (root / "cgroup.controllers").exists():
        limits = [int(t) for t in _cgroup_v2_files(root, proc_cgroup, "memory.max") if t.isdigit()]
    else:
        text = _read(root / "memory" / "memory.limit_in_bytes")
        if text and text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text))
    return min(limits) if limits else None


def available_memory(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None, meminfo: str | None = None) -> int:
    """Bytes of memory this process's container may use: the machine's (MemTotal), capped by the cgroup limit."""
    if meminfo is None:
        meminfo = _read(Path("/proc/meminfo")) or ""
    total = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    limit = cgroup_memory_limit(root, proc_cgroup)
    if not total:  # not Linux: no cap known beyond the cgroup's
        return limit if limit is not None else 1 << 62
    return min(total, limit) if limit is not None else total


def cpu_processes(cpus: int | None = None, memory: int | None = None) -> int:
    """Default worker processes on a CPU host (`imgpipe worker` without --concurrency): one per core, each with
    its own interpreter and GIL, as many as memory allows at ``defaults.CPU_PROCESS_MEMORY`` each, at least one.

    One process's Python work (messages, leases, records, decoding small images) holds one GIL: on 2 cores one
    process used 1.3 of them on the demo digits and two processes ran 1.5x its images/s (README, Benchmarks).
    Torch releases the GIL, so large models lose nothing: each process gets its share of the cores."""
    cpus = available_cpus() if cpus is None else cpus
    memory = available_memory() if memory is None else memory
    return max(1, min(cpus, memory // defaults.CPU_PROCESS_MEMORY))


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """Cores this process can use: its CPU affinity, capped by the cgroup quota (rounded down, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def decode_threads(cpus: int | None = None) -> int:
    """Default decode threads: one per available core (Pillow releases the GIL while decoding), capped."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, min(cpus, defaults.DECODE_THREADS_MAX))


def torch_threads(device_type: str, cpus: int | None = None, lanes: int = 0) -> int:
    """Default torch intra-op threads for an engine on ``device_type`` ("cpu" or "cuda") whose batches run on
    ``lanes`` threads at once, each decoding its own batch (``Engine.classify``, the worker's group threads);
    0: the default lanes, one per core (``decode_threads``).

    On a GPU the host threads only launch kernels and copy: one is enough and leaves the cores to decoding.
    On the CPU the lanes share the cores: each gets cores / lanes (one each when there is a lane per core, data
    parallel as a DataLoader's worker processes are, with no hand-off inside a batch; measured on 2 shared
    cores with the demo model: 2 lanes of 1 thread ran 2x the images/s of 1 batch thread of 1 beside 2 decode
    threads).
    """
    cpus = available_cpus() if cpus is None else cpus
    if device_type != "cpu":
        return 1
    return max(1, cpus // (lanes or decode_threads(cpus)))


def configure_openmp(environ: MutableMapping[str, str] | None = None) -> None:
    """Set the OpenMP wait policy to PASSIVE unless the user chose one: idle OpenMP threads then sleep at
    once instead of spinning on cores that decode threads and other processes need. OpenMP reads it when
    torch's runtime loads, so call this before torch is first imported (the ``imgpipe`` entry point does)."""
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", defaults.OMP_WAIT_POLICY)


def take_more(
    source: queue.SimpleQueue[T | None] | queue.Queue[T | None],
    into: list[T],
    full: Callable[[list[T]], bool],
) -> bool:
    """Append to ``into`` what ``source`` holds now, until ``full(into)``; never waits. Returns True when the stop
    sentinel (None) was taken. (A thread that must wait for more waits on a condition, not on a timed ``get``:
    worker/consumer.py ``Runner._fill``, docs/reliability.md on ``SimpleQueue.get(timeout)``.)"""
    while not full(into):
        try:
            item = source.get_nowait()
        except queue.Empty:
            return False
        if item is None:
            return True
        into.append(item)
    return False


def at_least(count: int) -> Callable[[list[T]], bool]:
    """``take_more``'s ``full`` for a number of items."""
    return lambda items: len(items) >= count


class OneThread:
    """Runs calls on one long-lived thread of its own and waits for them: ``run(fn, *args)`` returns what ``fn``
    returned there (or raises what it raised), whichever thread asks. A call made from that thread runs at once.

    For state that a library keeps per thread and builds slowly: PyTorch keeps cuDNN's execution plans (and the
    cuBLAS handles, the autocast cache) per thread, one plan per convolution shape. Measured on an H200 with a
    mobilenet_v3_small (scripts/gpu_configs.py): a batch of 64 took 5-7 ms on a warm thread, while 16 fresh
    threads taking turns ran 35 images/s, and each new batch size cost about 0.8 s on a thread the first time.
    The engine's lanes (and the worker's group threads) come and go; the thread that runs the model does not.
    The thread ends when the runner is closed or garbage-collected.
    """

    def __init__(self, name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident = self._pool.submit(threading.get_ident).result()

    def run(self, fn: Callable[..., T], *args: object) -> T:
        if threading.get_ident() == self._ident:  # already there (a call made from inside a call)
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    @property
    def ident(self) -> int:
        return self._ident

    def close(self) -> None:
        self._pool.shutdown(wait=True)
