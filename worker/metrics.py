"""Prometheus metrics of imgpipe: the one place metric names are spelled (``imgpipe_*``); the /metrics server.

No label takes a file path, job id or any other unbounded value: every label below has a fixed, small set of
values (status, stage, reason, model name/sha, device, GPU index).

Multiprocess mode: Celery's prefork pool counts images in child processes while one process serves /metrics.
When ``PROMETHEUS_MULTIPROC_DIR`` is set *before the worker starts* (prometheus_client reads it at import),
every process writes its values to files there and the server sums them (prometheus_client's
MultiProcessCollector). Gauges therefore name their multiprocess mode; none uses "all", which would add an
unbounded ``pid`` label.
"""

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

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
    values,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from imgpipe import __version__
from imgpipe.errors import ConfigError, ImageError
from imgpipe.settings import MetricsSettings

log = logging.getLogger(__name__)

# prometheus_client's own variable (not an IMGPIPE_* setting): in the environment before the process starts.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# ----------------------------------------------------------------------------------------------------
# Worker metrics: recorded by the processes that classify images.
# ----------------------------------------------------------------------------------------------------

# Images finished, by outcome: status is "ok" or "error". Counted once per image, even on redelivery.
IMAGES = Counter("imgpipe_images_total", "Images classified, by outcome", ["status"])
# Images per inference batch (cross-message batching shows as sizes above the message chunk size).
BATCH_SIZE = Histogram(
    "imgpipe_batch_size",
    "Images per inference batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
# Seconds per stage: decode (read + decode + preprocess, per image), infer (per batch), write (per message).
STAGE_SECONDS = Histogram(
    "imgpipe_stage_seconds",
    "Seconds spent per pipeline stage",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Failed images by bounded reason code (imgpipe.errors.ImageError.REASONS).
ERRORS = Counter("imgpipe_errors_total", "Images that failed, by reason", ["reason"])
# Messages moved to the dead-letter list after too many deliveries.
DEAD_LETTERS = Counter("imgpipe_dead_letters_total", "Messages dead-lettered after repeated failed delivery")
# Images this worker has taken from the queue and not yet recorded (summed over its live processes).
IN_FLIGHT = Gauge(
    "imgpipe_in_flight_images", "Images taken by this worker and not yet recorded", multiprocess_mode="livesum"
)
# Model each worker serves: imgpipe_model_info{name, sha} 1. A Gauge, not an Info: Info does not
# work in prometheus_client's multiprocess mode.
MODEL_INFO = Gauge("imgpipe_model_info", "Model served by this worker", ["name", "sha"], multiprocess_mode="max")
# The worker itself: imgpipe_worker_info{version, device} 1 while its metrics are served (Prometheus' `up`
# says whether it answers; this says what it is).
WORKER_INFO = Gauge(
    "imgpipe_worker_info",
    "imgpipe version and inference device of this worker",
    ["version", "device"],
    multiprocess_mode="max",
)
# Bytes held by PyTorch's CUDA allocator in this worker's processes, per GPU index.
GPU_ALLOCATED = Gauge(
    "imgpipe_gpu_memory_allocated_bytes", "CUDA memory allocated by this worker", ["gpu"], multiprocess_mode="livesum"
)

STAGES = ("decode", "infer", "write")
STATUSES = ("ok", "error")

# GPU-wide numbers read from NVML when /metrics is scraped (no CUDA context: safe in a process that forks).
GPU_MEMORY_USED = "imgpipe_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL = "imgpipe_gpu_memory_total_bytes"
GPU_UTILIZATION = "imgpipe_gpu_utilization_ratio"

# ----------------------------------------------------------------------------------------------------
# Queue and job metrics: read from Redis by imgpipe.worker.exporter.RedisCollector (one process, no mmap files).
# ----------------------------------------------------------------------------------------------------

# Messages (chunks of paths) waiting in the broker queue, all priorities.
QUEUE_DEPTH = "imgpipe_queue_depth"
# Messages delivered to a worker and not yet acknowledged (kombu's `unacked` hash): in flight or prefetched.
QUEUE_UNACKED = "imgpipe_queue_unacked"
# Images enqueued but not yet recorded, summed over active jobs (per-job numbers never become labels).
BACKLOG_IMAGES = "imgpipe_backlog_images"
# Jobs not finished yet.
JOBS_ACTIVE = "imgpipe_jobs_active"
# Age of the oldest unfinished job.
OLDEST_JOB_AGE = "imgpipe_oldest_job_age_seconds"
# Images recorded per second over the exporter's recent window (all jobs).
RECENT_RATE = "imgpipe_recent_rate_images_per_second"
# Estimated seconds to clear the backlog at the recent rate (+Inf while a backlog does not move).
DRAIN_SECONDS = "imgpipe_drain_seconds"
# Messages in the dead-letter list.
DEAD_LETTER_MESSAGES = "imgpipe_dead_letter_messages"
# 1 when the last read of Redis succeeded.
REDIS_UP = "imgpipe_redis_up"


# ----------------------------------------------------------------------------------------------------
# Recording helpers for worker processes.
# ----------------------------------------------------------------------------------------------------


def describe_worker(device: str, model_name: str, model_sha: str) -> None:
    """Set the info gauges once the model is loaded: version/device, model name and sha (12-hex prefix)."""
    WORKER_INFO.labels(version=__version__, device=device).set(1)
    MODEL_INFO.labels(name=model_name, sha=model_sha[:12]).set(1)


@contextlib.contextmanager
def in_flight(images: int) -> Iterator[None]:
    """Count ``images`` as in flight for the duration of the block."""
    IN_FLIGHT.inc(images)
    try:
        yield
    finally:
        IN_FLIGHT.dec(images)


def observe_device(device: Any) -> None:
    """After a batch on a CUDA device, record this process's allocator memory (no-op on the CPU)."""
    if getattr(device, "type", None) != "cuda":
        return
    import torch  # lazily: producer and exporter hosts have no torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    GPU_ALLOCATED.labels(gpu=str(index)).set(torch.cuda.memory_allocated(index))


# ----------------------------------------------------------------------------------------------------
# Collectors and the /metrics server.
# ----------------------------------------------------------------------------------------------------


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


def initialise_series() -> None:
    """Create every labelled worker series at 0, so that rate() sees the first images and panels show zeros."""
    for status in STATUSES:
        IMAGES.labels(status=status)
    for stage in STAGES:
        STAGE_SECONDS.labels(stage=stage)
    for reason in ImageError.REASONS:
        ERRORS.labels(reason=reason)


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
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    # Format: "pid (comm) state ...": comm may contain spaces or parentheses, so split at the last ')'.
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"
