"""`imgpipe exporter`: queue and job metrics from Redis (depth, in flight, backlog, drain time, dead letters).

The collector can also be added to a worker's /metrics. No torch, no Celery app.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imgpipe import broker, defaults, keys
from imgpipe.jobs import RATE_WINDOW_S, RateWindow, drain_seconds, read_jobs
from imgpipe.settings import RedisSettings
from imgpipe.worker import metrics

log = logging.getLogger(__name__)

# Seconds between background reads of Redis, so the recent rate has samples between scrapes.
SAMPLE_INTERVAL_S = defaults.EXPORTER_SAMPLE_S


def queue_keys(queue: str) -> list[str]:
    """Redis lists holding ``queue``'s messages: kombu keeps one list per priority step."""
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]


@dataclass(frozen=True)
class Snapshot:
    """One read of Redis, plus the rate estimate it updated."""

    at: float
    queue_depth: int
    unacked: int
    dead_letters: int
    jobs_active: int
    backlog: int
    oldest_active_age: float
    rate: float | None  # images/s over the recent window; None until there are two samples
    drain: float | None  # seconds; None while the rate is unknown and there is a backlog


def read_snapshot(client: Any, queue: str, window: RateWindow, now: float) -> Snapshot:
    """Read queue lengths and job counters in two pipelined round trips and feed ``window``."""
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(queue):
        pipe.llen(key)
    pipe.hlen(Channel.unacked_key)
    pipe.llen(keys.DEAD_LETTER)
    *depths, unacked, dead = pipe.execute()
    jobs = read_jobs(client)
    window.add(now, {job.job_id: job.completed for job in jobs})
    active = [job for job in jobs if job.active]
    backlog = sum(job.backlog for job in active)
    rate = window.rate()
    drain = drain_seconds(backlog, rate) if rate is not None or backlog == 0 else None
    oldest = min((job.created for job in active if job.created > 0), default=None)
    return Snapshot(
        at=now,
        queue_depth=int(sum(depths)),
        unacked=int(unacked),
        dead_letters=int(dead),
        jobs_active=len(active),
        backlog=backlog,
        oldest_active_age=max(0.0, now - oldest) if oldest is not None else 0.0,
        rate=rate,
        drain=drain,
    )


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
            return read_snapshot(self.client, self.queue, self._window, self._clock())

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
        yield _gauge(metrics.QUEUE_DEPTH, "Messages waiting in the queue", snap.queue_depth)
        yield _gauge(metrics.QUEUE_UNACKED, "Messages delivered, not yet acknowledged", snap.unacked)
        yield _gauge(metrics.BACKLOG_IMAGES, "Images enqueued, not yet recorded", snap.backlog)
        yield _gauge(metrics.JOBS_ACTIVE, "Jobs not finished", snap.jobs_active)
        yield _gauge(metrics.OLDEST_JOB_AGE, "Age of the oldest unfinished job", snap.oldest_active_age)
        yield _gauge(metrics.DEAD_LETTER_MESSAGES, "Messages in the dead-letter list", snap.dead_letters)
        if snap.rate is not None:
            yield _gauge(metrics.RECENT_RATE, "Images recorded per second over the recent window", snap.rate)
        if snap.drain is not None:
            yield _gauge(metrics.DRAIN_SECONDS, "Seconds to clear the backlog at the recent rate", snap.drain)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))
