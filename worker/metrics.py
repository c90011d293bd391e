"""Prometheus metrics of imgpipe: the one place metric names are spelled (``imgpipe_*``), and recording helpers.

The /metrics server, multiprocess file handling and the NVML collector are in worker/metrics_server.py.

No label takes a file path, job id or any other unbounded value: every label below has a fixed, small set of
values (status, stage, reason, cause, model name/sha, device, GPU index; the exporter's queue: the default
queue and at most imgpipe.worker.exporter.MAX_MODEL_QUEUES model queues).

Multiprocess mode: Celery's prefork pool counts images in child processes while one process serves /metrics.
When ``PROMETHEUS_MULTIPROC_DIR`` is set *before the worker starts* (prometheus_client reads it at import),
every process writes its values to files there and the server sums them (prometheus_client's
MultiProcessCollector). Gauges therefore name their multiprocess mode; none uses "all", which would add an
unbounded ``pid`` label.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    Counter,
    Gauge,
    Histogram,
)

from imgpipe import __version__
from imgpipe.errors import ImageError

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
# Seconds from a message's receipt by the worker to one image's record being ready (the p95 target of
# IMGPIPE_MAX_LATENCY_MS is on this): queueing for a work slot, decode, batch fill wait and inference.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
IMAGE_LATENCY = Histogram(
    "imgpipe_image_latency_seconds", "Seconds from message receipt to the image's record", buckets=LATENCY_BUCKETS
)
# Seconds from the producer's send (the message's imgpipe_sent header, the producer's clock) to the image's record
# written: the queue's wait included, which IMAGE_LATENCY leaves out. Hosts' clocks must agree (NTP); messages
# without the header (third-party producers) and messages run alone (suspects) are not observed.
END_TO_END = Histogram(
    "imgpipe_image_end_to_end_seconds",
    "Seconds from the producer's send to the image's record written",
    buckets=LATENCY_BUCKETS,
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

# Per queue (label ``queue``: the default queue, or a model queue imgpipe:model:<sha12>; see
# imgpipe.worker.exporter.queues_to_report for which ones): messages (chunks of paths) waiting, all priorities.
QUEUE_DEPTH = "imgpipe_queue_depth"
# Per queue: images enqueued and not yet recorded, summed over the active jobs whose messages go to the queue.
QUEUE_BACKLOG_IMAGES = "imgpipe_queue_backlog_images"
# Per queue: images recorded per second over the recent window by the jobs of the queue.
QUEUE_RECENT_RATE = "imgpipe_queue_recent_rate_images_per_second"
# Per queue: seconds to clear the queue's backlog at its recent rate (+Inf while it does not move).
QUEUE_DRAIN_SECONDS = "imgpipe_queue_drain_seconds"
# Per queue: hosts (pods, containers, machines) with a live worker process consuming the queue, from the
# worker registry's heartbeats; 0 for a queue that has work and nobody to do it.
QUEUE_WORKER_HOSTS = "imgpipe_queue_worker_hosts"
# Label of the per-queue series.
QUEUE_LABEL = "queue"
# Messages delivered to a worker and not yet acknowledged (kombu's `unacked` hash): in flight or prefetched.
QUEUE_UNACKED = "imgpipe_queue_unacked"
# Whole pipeline, no labels (every queue together; the recording rules and alerts use these):
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


def observe_many(histogram: Any, amounts: Iterable[float]) -> None:
    """``histogram.observe(a)`` for each amount, with one increment per bucket touched and one of the sum.

    In multiprocess mode every increment takes a lock and writes the value's mmap file: two per observation,
    twice per image (decode time, latency), were a tenth of a one-path message's Python time in the worker.
    A series without prometheus_client's internals as read here (another version) observes one by one."""
    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for amount in amounts:
            histogram.observe(amount)
        return
    counts: collections.Counter[int] = collections.Counter()
    summed = 0.0
    for amount in amounts:
        counts[bisect.bisect_left(bounds, amount)] += 1  # the first bound >= amount, as observe() finds it
        summed += amount
    if not counts:
        return
    total.inc(summed)
    for index, count in counts.items():
        buckets[index].inc(count)


def observe_device(device: Any) -> None:
    """After a batch on a CUDA device, record this process's allocator memory (no-op on the CPU)."""
    if getattr(device, "type", None) != "cuda":
        return
    import torch  # lazily: producer and exporter hosts have no torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    GPU_ALLOCATED.labels(gpu=str(index)).set(torch.cuda.memory_allocated(index))


def initialise_series() -> None:
    """Create every labelled worker series at 0, so that rate() sees the first images and panels show zeros."""
    for status in STATUSES:
        IMAGES.labels(status=status)
    for stage in STAGES:
        STAGE_SECONDS.labels(stage=stage)
    for reason in ImageError.REASONS:
        ERRORS.labels(reason=reason)
    for reason in REFUSAL_REASONS:
        REFUSED.labels(reason=reason)
    for cause in RESEND_CAUSES:
        RESENT.labels(cause=cause)


# Messages a worker refused before any Redis write, by reason: what worker/transport.py drops at the queue
# (junk, content_type, unknown_task) and what imgpipe.messages.parse refuses (the others).
REFUSED = Counter("imgpipe_messages_refused_total", "Messages refused by a worker, by reason", ["reason"])
REFUSAL_REASONS = (
    "junk",
    "content_type",
    "unknown_task",
    "message_id",
    "version",
    "schema",
    "job_id",
    "too_many_paths",
    "too_large",
)
# Messages sent again, by cause: "reconciler" (lost from the queue, or its lease expired), "model" (a pinned
# job's message found in another model's queue, moved to its own).
RESENT = Counter("imgpipe_messages_resent_total", "Messages re-sent by the reconciler, by cause", ["cause"])
RESEND_CAUSES = ("reconciler", "model")
# Copies of a message dropped because another worker holds its lease or its records are all written.
DUPLICATES = Counter("imgpipe_duplicate_messages_total", "Duplicate message copies dropped")
