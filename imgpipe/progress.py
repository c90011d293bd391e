"""Job progress read from Redis, and the one recent-rate and drain-time estimate (exporter and status)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imgpipe import keys

# Jobs read per sample, newest first: bounds the Redis work of one scrape however many jobs are kept.
MAX_JOBS_READ = 10_000
# Seconds of history behind a "recent" rate: long enough to smooth batch bursts, short enough to follow load.
RATE_WINDOW_S = 60.0

_FIELDS = ("total", "done", "failed", "created", "finished", "sealed")


@dataclass(frozen=True)
class JobProgress:
    """One job's counters as the producer and workers keep them in its Redis hash."""

    job_id: str
    total: int
    done: int
    failed: int
    created: float
    finished: float | None
    sealed: bool

    @property
    def completed(self) -> int:
        """Images with a record: classified or failed."""
        return self.done + self.failed

    @property
    def backlog(self) -> int:
        """Images enqueued but not yet recorded (0 once the job is finished)."""
        return 0 if self.finished is not None else max(0, self.total - self.completed)

    @property
    def active(self) -> bool:
        """Still running: not finished, with images left or enqueueing still going on."""
        return self.finished is None and (self.backlog > 0 or not self.sealed)

    @classmethod
    def from_hash(cls, job_id: str, values: Sequence[Any]) -> JobProgress | None:
        """Build from HMGET values in ``_FIELDS`` order; None when the hash no longer exists."""
        raw = dict(zip(_FIELDS, (as_text(v) for v in values), strict=True))
        if all(v is None for v in raw.values()):
            return None
        return cls(
            job_id=job_id,
            total=as_int(raw["total"]),
            done=as_int(raw["done"]),
            failed=as_int(raw["failed"]),
            created=as_float(raw["created"]) or 0.0,
            finished=as_float(raw["finished"]),
            sealed=raw["sealed"] not in (None, "", "0"),
        )


def recent_job_ids(client: Any, limit: int = MAX_JOBS_READ) -> list[str]:
    """The newest ``limit`` job ids, newest first."""
    return [as_text(j) or "" for j in client.zrevrange(keys.JOBS, 0, limit - 1)]


def read_jobs_with(
    client: Any, job_ids: Sequence[str], extra: Sequence[str] = ()
) -> list[tuple[JobProgress, list[str | None]]]:
    """Progress of ``job_ids`` plus the ``extra`` fields of each job's hash, in one pipelined round trip.

    ``client`` is a ``redis.Redis``; jobs whose hash has expired are left out.
    """
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(keys.job(job_id), [*_FIELDS, *extra])
    jobs = []
    for job_id, values in zip(job_ids, pipe.execute(), strict=True):
        job = JobProgress.from_hash(job_id, values[: len(_FIELDS)])
        if job is not None:
            jobs.append((job, [as_text(v) for v in values[len(_FIELDS) :]]))
    return jobs


def read_jobs(
    client: Any, job_ids: Sequence[str] | None = None, limit: int = MAX_JOBS_READ
) -> list[JobProgress]:
    """Progress of ``job_ids`` (default: the newest ``limit`` jobs); jobs whose hash has expired are left out."""
    ids = recent_job_ids(client, limit) if job_ids is None else job_ids
    return [job for job, _ in read_jobs_with(client, ids)]


class RateWindow:
    """Images completed per second over the last ``window`` seconds, from successive per-job counts.

    Feed it ``add(now, {job_id: completed})`` every few seconds. Counts are compared job by job, so a job
    that expires from Redis does not make the rate negative, and a job that appears counts from zero.
    """

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        if window <= 0:
            raise ValueError(f"rate window must be positive, got {window}")
        self.window = window
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def add(self, now: float, counts: Mapping[str, int]) -> None:
        """Record the completed count of each job at time ``now`` (seconds, monotonic or epoch)."""
        if self._samples and now <= self._samples[-1][0]:
            return  # same instant (or a clock step back): nothing new to learn
        self._samples.append((now, dict(counts)))
        # Keep exactly one sample at or before the window's start, as the rate's base.
        while len(self._samples) >= 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self, job_id: str | None = None) -> float | None:
        """Images per second (of one job, or of all); None until two samples are at least a second apart."""
        if len(self._samples) < 2:
            return None
        (t0, old), (t1, new) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0:
            return None
        ids = new.keys() if job_id is None else [job_id]
        gained = sum(max(0, new.get(j, 0) - old.get(j, 0)) for j in ids)
        return gained / (t1 - t0)


def drain_seconds(backlog: int, rate: float | None) -> float:
    """Estimated seconds to clear ``backlog`` at ``rate`` images/s: 0 when empty, +Inf when nothing moves."""
    if backlog <= 0:
        return 0.0
    if rate is None or rate <= 0:
        return math.inf
    return backlog / rate


def as_text(value: Any) -> str | None:
    """A Redis reply value (bytes, str or None) as text."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def as_int(value: str | None) -> int:
    """A counter field as an int (0 when absent or malformed)."""
    try:
        return int(float(value)) if value else 0
    except ValueError:
        return 0


def as_float(value: str | None) -> float | None:
    """A timestamp field as a float (None when absent or malformed)."""
    try:
        return float(value) if value else None
    except ValueError:
        return None
