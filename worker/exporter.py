"""`imgpipe exporter`: queue and job metrics from Redis (depth, in flight, backlog, drain time, dead letters),
for the whole pipeline and per queue (the default queue and the per-model queues).

The collector can also be added to a worker's /metrics. No torch, no Celery app.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imgpipe import broker, defaults, keys
from imgpipe.jobs import (
    MAX_JOBS_READ,
    RATE_WINDOW_S,
    RateWindow,
    as_text,
    drain_seconds,
    parse_job_reads,
    pin_queue,
    queue_job_reads,
)
from imgpipe.registry import WorkerInfo
from imgpipe.settings import RedisSettings
from imgpipe.worker import metrics

log = logging.getLogger(__name__)

# Seconds between background reads of Redis, so the recent rate has samples between scrapes.
SAMPLE_INTERVAL_S = defaults.EXPORTER_SAMPLE_S


def queue_keys(queue: str) -> list[str]:
    """Redis lists holding ``queue``'s messages: kombu keeps one list per priority step."""
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]


# A model queue's name (keys.model_queue), at the start of any of its priority lists' keys.
_MODEL_QUEUE = re.compile(re.escape(keys.model_queue("")) + r"[0-9a-f]{12}")
# SCAN pattern for the model queues' lists, and keys looked at per sample (one SCAN step, never KEYS).
MODEL_QUEUE_MATCH = keys.model_queue("*")
SCAN_COUNT = 1000
# Model queues reported at most (the default queue always is): the `queue` label's values stay few.
MAX_MODEL_QUEUES = 50


def model_queue_of(key: str) -> str | None:
    """The model queue a Redis key belongs to (its priority lists included), or None."""
    match = _MODEL_QUEUE.match(key)
    return match.group(0) if match else None


@dataclass
class QueueScan:
    """Model queues found by stepping a SCAN cursor through the key space, one step per sample: a model queue
    that holds messages though no live worker or active job names it is found within a few samples."""

    cursor: int = 0
    found: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class QueueSnapshot:
    """One queue's figures."""

    depth: int  # messages waiting, all priorities
    backlog: int  # images of the active jobs whose messages go to this queue
    rate: float | None  # images/s of this queue's jobs over the recent window
    drain: float | None  # seconds; None while the rate is unknown and there is a backlog
    worker_hosts: int  # hosts with a live worker consuming this queue


@dataclass(frozen=True)
class Snapshot:
    """One read of Redis, plus the rate estimate it updated."""

    at: float
    queue_depth: int  # every reported queue
    unacked: int
    dead_letters: int
    jobs_active: int
    backlog: int
    oldest_active_age: float
    rate: float | None  # images/s over the recent window; None until there are two samples
    drain: float | None  # seconds; None while the rate is unknown and there is a backlog
    queues: dict[str, QueueSnapshot] = field(default_factory=dict)


def queues_to_report(default: str, named: Iterable[str], found: Iterable[str]) -> list[str]:
    """The default queue, then model queues named by active jobs and live workers (``named``) or found in Redis
    (``found``), at most MAX_MODEL_QUEUES of them; anything that is not a model queue's name is left out."""
    models = sorted({q for q in named if q != default and _MODEL_QUEUE.fullmatch(q)})
    models += sorted({q for q in found if _MODEL_QUEUE.fullmatch(q)} - {default, *models})
    if len(models) > MAX_MODEL_QUEUES:
        log.warning("%d model queues; reporting the first %d", len(models), MAX_MODEL_QUEUES)
    return [default, *models[:MAX_MODEL_QUEUES]]


def read_snapshot(client: Any, queue: str, window: RateWindow, now: float, scan: QueueScan | None = None) -> Snapshot:
    """Read queues, jobs and worker heartbeats in three pipelined round trips and feed ``window``.

    1. job ids, worker ids, unacknowledged and dead-lettered counts, one SCAN step for model queues;
    2. every job's counters and pin, every worker's heartbeat;
    3. the length of each reported queue's lists.
    """
    scan = scan if scan is not None else QueueScan()
    pipe = client.pipeline(transaction=False)
    pipe.zrevrange(keys.JOBS, 0, MAX_JOBS_READ - 1)
    pipe.zrangebyscore(keys.WORKERS, now - 10 * defaults.HEARTBEAT_TTL_S, "+inf")
    pipe.hlen(Channel.unacked_key)
    pipe.llen(keys.DEAD_LETTER)
    pipe.scan(scan.cursor, match=MODEL_QUEUE_MATCH, count=SCAN_COUNT)
    job_ids_raw, worker_ids_raw, unacked, dead, (cursor, scanned) = pipe.execute()
    job_ids = [as_text(j) or "" for j in job_ids_raw]
    worker_ids = [as_text(w) or "" for w in worker_ids_raw]
    scan.cursor = int(cursor)
    scan.found |= {q for q in (model_queue_of(as_text(k) or "") for k in scanned) if q is not None}

    pipe = client.pipeline(transaction=False)
    queue_job_reads(pipe, job_ids, ("pin",))
    for worker_id in worker_ids:
        pipe.get(keys.worker(worker_id))
    replies = pipe.execute()
    jobs = parse_job_reads(job_ids, replies[: len(job_ids)])
    workers = [w for w in (WorkerInfo.from_json(r) for r in replies[len(job_ids) :] if r is not None) if w]

    job_queue = {job.job_id: pin_queue(pin, queue) for job, (pin,) in jobs}
    active = [job for job, _ in jobs if job.active]
    hosts: dict[str, set[str]] = {}
    for worker in workers:
        for name in worker.queues:
            hosts.setdefault(name, set()).add(worker.host)
    named = {job_queue[job.job_id] for job in active} | set(hosts)
    reported = queues_to_report(queue, named, scan.found)

    pipe = client.pipeline(transaction=False)
    for name in reported:
        for key in queue_keys(name):
            pipe.llen(key)
    lengths = iter(pipe.execute())
    depths = {name: sum(int(next(lengths)) for _ in PRIORITY_STEPS) for name in reported}
    scan.found = {q for q in scan.found if depths.get(q, 0) > 0}  # forget the emptied ones

    window.add(now, {job.job_id: job.completed for job, _ in jobs})
    backlog = sum(job.backlog for job in active)
    rate = window.rate()
    jobs_of: dict[str, list[str]] = {}
    backlog_of: dict[str, int] = {}
    for job_id, name in job_queue.items():
        jobs_of.setdefault(name, []).append(job_id)
    for job in active:
        backlog_of[job_queue[job.job_id]] = backlog_of.get(job_queue[job.job_id], 0) + job.backlog
    per_queue = {}
    for name in reported:
        queue_backlog = backlog_of.get(name, 0)
        queue_rate = window.rate_of(jobs_of.get(name, []))
        per_queue[name] = QueueSnapshot(
            depth=depths[name],
            backlog=queue_backlog,
            rate=queue_rate,
            drain=_drain(queue_backlog, queue_rate),
            worker_hosts=len(hosts.get(name, ())),
        )
    oldest = min((job.created for job in active if job.created > 0), default=None)
    return Snapshot(
        at=now,
        queue_depth=sum(depths.values()),
        unacked=int(unacked),
        dead_letters=int(dead),
        jobs_active=len(active),
        backlog=backlog,
        oldest_active_age=max(0.0, now - oldest) if oldest is not None else 0.0,
        rate=rate,
        drain=_drain(backlog, rate),
        queues=per_queue,
    )


def _drain(backlog: int, rate: float | None) -> float | None:
    return drain_seconds(backlog, rate) if rate is not None or backlog == 0 else None


class RedisCollector(Collector):
    """Prometheus collector over one Redis: every scrape reads it afresh; ``start()`` also samples in the
    background so the recent rate has a base however rarely Prometheus scrapes."""

    def __init__(
        self,
        client: Any,
        queue: str,
        *,
        window: float = RATE_WINDOW_S,
        interval: float = SAMPLE_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.queue = queue
        self.interval = interval
        self._clock = clock
        self._window = RateWindow(window)
        self._scan = QueueScan()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: RedisSettings, **kwargs: Any) -> RedisCollector:
        """A collector on a client for ``settings.url`` (passwords and ``rediss://`` work); no PING yet."""
        return cls(broker.redis_client(settings, check=False), settings.queue, **kwargs)

    def sample(self) -> Snapshot:
        """Read Redis now (raises redis.RedisError when it is unreachable)."""
        with self._lock:
            return read_snapshot(self.client, self.queue, self._window, self._clock(), self._scan)

    def start(self) -> RedisCollector:
        """Sample every ``interval`` seconds in a daemon thread until ``stop()``."""
        self._thread = threading.Thread(target=self._run, name="imgpipe-exporter-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except redis.RedisError as exc:
                log.warning("reading Redis failed: %s", exc)

    def collect(self) -> Iterator[Metric]:
        try:
            snap: Snapshot | None = self.sample()
        except redis.RedisError as exc:
            log.warning("reading Redis failed: %s", exc)
            snap = None
        yield _gauge(metrics.REDIS_UP, "1 when the last read of Redis succeeded", 0 if snap is None else 1)
        if snap is None:
            return
        for name, documentation, figure in _PER_QUEUE:
            yield _per_queue(name, documentation, snap, figure)
        yield _gauge(metrics.QUEUE_UNACKED, "Messages delivered, not yet acknowledged", snap.unacked)
        yield _gauge(metrics.BACKLOG_IMAGES, "Images enqueued, not yet recorded", snap.backlog)
        yield _gauge(metrics.JOBS_ACTIVE, "Jobs not finished", snap.jobs_active)
        yield _gauge(metrics.OLDEST_JOB_AGE, "Age of the oldest unfinished job", snap.oldest_active_age)
        yield _gauge(metrics.DEAD_LETTER_MESSAGES, "Messages in the dead-letter list", snap.dead_letters)
        if snap.rate is not None:
            yield _gauge(metrics.RECENT_RATE, "Images recorded per second over the recent window", snap.rate)
        if snap.drain is not None:
            yield _gauge(metrics.DRAIN_SECONDS, "Seconds to clear the backlog at the recent rate", snap.drain)


# The per-queue series: name, help text, the figure of a QueueSnapshot (None: no series for that queue).
_PER_QUEUE: tuple[tuple[str, str, Callable[[QueueSnapshot], float | None]], ...] = (
    (metrics.QUEUE_DEPTH, "Messages waiting, per queue", lambda q: q.depth),
    (metrics.QUEUE_BACKLOG_IMAGES, "Images enqueued, not yet recorded, per queue", lambda q: q.backlog),
    (metrics.QUEUE_RECENT_RATE, "Images recorded per second over the recent window, per queue", lambda q: q.rate),
    (metrics.QUEUE_DRAIN_SECONDS, "Seconds to clear the queue's backlog at its recent rate", lambda q: q.drain),
    (metrics.QUEUE_WORKER_HOSTS, "Hosts with a live worker consuming the queue", lambda q: q.worker_hosts),
)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _per_queue(
    name: str, documentation: str, snap: Snapshot, figure: Callable[[QueueSnapshot], float | None]
) -> GaugeMetricFamily:
    """One series per reported queue (label ``queue``); a queue whose figure is unknown has none."""
    family = GaugeMetricFamily(name, documentation, labels=[metrics.QUEUE_LABEL])
    for queue, figures in snap.queues.items():
        value = figure(figures)
        if value is not None:
            family.add_metric([queue], float(value))
    return family
