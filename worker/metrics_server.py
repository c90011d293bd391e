"""The /metrics server of a worker (or the exporter): the registry, multiprocess sums over live processes only
(stale and SIGKILLed processes' files dropped, via /proc), and NVML GPU gauges read at scrape time."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from threading import Thread
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, ProcessCollector, start_http_server, values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from imgpipe.errors import ConfigError
from imgpipe.procs import stat_fields
from imgpipe.settings import MetricsSettings
from imgpipe.worker.metrics import (
    GPU_MEMORY_TOTAL,
    GPU_MEMORY_USED,
    GPU_UTILIZATION,
    MULTIPROC_ENV,
    initialise_series,
)

log = logging.getLogger(__name__)


class NvmlCollector(Collector):
    """GPU memory used/total and utilisation of every GPU NVML sees, read at scrape time.

    NVML (the library behind nvidia-smi and ``torch.cuda.utilization``) needs no CUDA context, so this is
    safe in the process that forks Celery's pool. ``nvml`` is the ``pynvml`` module (package nvidia-ml-py).
    """

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        nvml.nvmlInit()
        self._count = int(nvml.nvmlDeviceGetCount())

    @classmethod
    def create(cls) -> NvmlCollector | None:
        """A collector when NVML and at least one GPU are present, else None (CPU hosts)."""
        try:
            import pynvml
        except ImportError:
            return None
        try:
            collector = cls(pynvml)
        except Exception as exc:  # no driver, no GPU
            log.debug("NVML not available: %s", exc)
            return None
        return collector if collector._count > 0 else None

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(GPU_MEMORY_USED, "GPU memory in use (all processes), NVML", labels=["gpu"])
        total = GaugeMetricFamily(GPU_MEMORY_TOTAL, "GPU memory size, NVML", labels=["gpu"])
        util = GaugeMetricFamily(
            GPU_UTILIZATION, "Fraction of the last sample period a kernel ran, NVML", labels=["gpu"]
        )
        for i in range(self._count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as exc:  # a GPU fallen off the bus must not break the scrape
                log.warning("NVML read of GPU %d failed: %s", i, exc)
                continue
            used.add_metric([str(i)], float(memory.used))
            total.add_metric([str(i)], float(memory.total))
            util.add_metric([str(i)], float(rates.gpu) / 100.0)
        yield from (used, total, util)


class LiveMultiProcessCollector(MultiProcessCollector):
    """MultiProcessCollector that first drops the "live" gauge files of processes that died unannounced.

    A pool child killed with SIGKILL never runs its shutdown hook, so its in-flight and GPU-memory gauges
    would otherwise stay in the sums. Counters and histograms of dead processes are kept: what they counted
    happened.
    """

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        self.path = path
        super().__init__(registry, path)

    def collect(self) -> Iterable[Metric]:
        for pid in _pids_with_files(self.path, "gauge_live*_*.db"):
            if not _alive(pid):
                mark_process_dead(pid, self.path)
        return super().collect()


@dataclass
class MetricsServer:
    """A running /metrics endpoint."""

    server: Any
    thread: Thread
    port: int
    multiprocess: bool

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def multiprocess_dir() -> str | None:
    """The multiprocess directory when multiprocess mode is on; ConfigError when it is half on."""
    path = os.environ.get(MULTIPROC_ENV) or None
    active = values.ValueClass is not values.MutexValue
    if path is None:
        return None
    if not active:
        raise ConfigError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported; set it in the environment "
            "before starting the process"
        )
    if not os.path.isdir(path):
        raise ConfigError(f"{MULTIPROC_ENV}={path!r} is not a directory; create it (empty) before starting")
    return path


def remove_stale_files(path: str) -> int:
    """Delete metric files of processes that no longer exist (a previous run's); returns how many.

    Called when a worker starts, before its pool forks. Files of live processes (this one's) are kept.
    """
    removed = 0
    for pid in _pids_with_files(path, "*.db"):
        if not _alive(pid):
            for name in glob.glob(os.path.join(path, f"*_{pid}.db")):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(name)
                    removed += 1
    return removed


def mark_this_process_dead() -> None:
    """For a pool child's shutdown hook: drop its live gauges (in flight, GPU memory) from the sums."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and values.ValueClass is not values.MutexValue:
        mark_process_dead(os.getpid(), path)


def build_registry(collectors: Iterable[Collector] = (), *, worker: bool = True) -> tuple[CollectorRegistry, bool]:
    """The registry /metrics serves, plus whether it is in multiprocess mode.

    ``worker``: the worker metrics above, summed over every process in multiprocess mode (else this process's
    own, with process/platform metrics), and NVML GPU gauges when a GPU exists. Not a worker (the exporter):
    only ``collectors`` and this process's resource usage. ``collectors`` are added in both cases
    (e.g. imgpipe.worker.exporter.RedisCollector).
    """
    registry = CollectorRegistry()
    path = multiprocess_dir() if worker else None
    if not worker:
        ProcessCollector(registry=registry)
    elif path is not None:
        remove_stale_files(path)
        LiveMultiProcessCollector(registry, path)
    else:
        registry.register(_DefaultRegistry())
    if worker:
        initialise_series()
    for collector in collectors:
        registry.register(collector)
    if worker:
        nvml = NvmlCollector.create()
        if nvml is not None:
            registry.register(nvml)
    return registry, path is not None


def start_metrics_server(
    settings: MetricsSettings, collectors: Iterable[Collector] = (), *, worker: bool = True
) -> MetricsServer | None:
    """Serve /metrics on ``settings.bind``:``settings.port`` (0: any free port) from a background thread.

    In a worker, start it in the process that forks the pool, before it forks. None when no port is set.
    """
    if settings.port is None:
        return None
    registry, multiprocess = build_registry(collectors, worker=worker)
    try:
        server, thread = start_http_server(settings.port, addr=settings.bind, registry=registry)
    except OSError as exc:
        where = f"{settings.bind}:{settings.port}"
        raise ConfigError(f"cannot serve metrics on {where}: {exc.strerror}") from None
    port = int(server.server_port)
    log.info(
        "metrics on http://%s:%d/metrics (%s)",
        settings.bind,
        port,
        "multiprocess" if multiprocess else "single process",
    )
    return MetricsServer(server=server, thread=thread, port=port, multiprocess=multiprocess)


class _DefaultRegistry(Collector):
    """This process's default registry (metrics above plus process/platform/gc), as one collector."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


_PID_RE = re.compile(r"_(\d+)\.db$")


def _pids_with_files(path: str, pattern: str) -> set[int]:
    pids = set()
    for name in glob.glob(os.path.join(path, pattern)):
        match = _PID_RE.search(name)
        if match:
            pids.add(int(match.group(1)))
    return pids


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has exited but not been reaped by its parent yet (Linux; False where /proc is absent)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] == "Z"
