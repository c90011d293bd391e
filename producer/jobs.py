"""The job record in Redis: create, add to the total, seal, read progress (rate, ETA) and the records."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from imgpipe import keys
from imgpipe.errors import ConfigError
from imgpipe.progress import JobProgress, as_float, read_jobs_with, recent_job_ids
from imgpipe.records import Record

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KINDS = ("batch", "stream")

# Marks a job finished once it is sealed and every image has a record. Shared with worker/store.py, which
# runs it after each write, so whichever side sees the last count sets `finished` (exactly once: HSETNX).
FINISH_IF_COMPLETE_LUA = """
local function finish_if_complete(job, now)
  local v = redis.call('HMGET', job, 'total', 'done', 'failed', 'sealed')
  if v[4] == '1' and (tonumber(v[2]) or 0) + (tonumber(v[3]) or 0) >= (tonumber(v[1]) or 0) then
    redis.call('HSETNX', job, 'finished', now)
  end
end
local function now_string()
  local t = redis.call('TIME')
  return string.format('%d.%06d', tonumber(t[1]), tonumber(t[2]))
end
"""

_SEAL_LUA = FINISH_IF_COMPLETE_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'sealed', '1')
finish_if_complete(KEYS[1], now_string())
return 1
"""


def new_job_id() -> str:
    """A readable, time-ordered job id: ``20250101-120000-3f9a1c``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def check_job_id(job_id: str) -> str:
    """ConfigError unless ``job_id`` is 1-64 letters, digits, '.', '_' or '-' (it is part of Redis keys)."""
    if not JOB_ID_PATTERN.match(job_id):
        raise ConfigError(f"job id {job_id!r} is not valid; use 1-64 letters, digits, '.', '_' or '-'")
    return job_id


def create_job(
    client: redis.Redis,
    job_id: str | None,
    *,
    kind: str,
    roots: Sequence[str],
    ttl_seconds: int,
) -> str:
    """Create an empty, unsealed job and return its id; ConfigError if the id is taken."""
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}; valid: {', '.join(KINDS)}")
    job_id = check_job_id(job_id) if job_id is not None else new_job_id()
    key = keys.job(job_id)
    now = time.time()
    if not client.hsetnx(key, "created", f"{now:.6f}"):
        raise ConfigError(f"job {job_id!r} already exists; choose another --job id (`imgpipe status` lists jobs)")
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, mapping={"total": 0, "done": 0, "failed": 0, "sealed": 0, "kind": kind,
                            "roots": json.dumps(list(roots))})
    pipe.expire(key, ttl_seconds)
    pipe.zadd(keys.JOBS, {job_id: now})
    pipe.execute()
    return job_id


def add_to_total(pipe: Any, job_id: str, count: int, ttl_seconds: int) -> None:
    """Queue, on a Redis pipeline, the increase of a job's total by ``count`` images about to be enqueued."""
    pipe.hincrby(keys.job(job_id), "total", count)
    pipe.expire(keys.job(job_id), ttl_seconds)


def add_pending(pipe: Any, job_id: str, messages: dict[str, list[str]], ttl_seconds: int) -> None:
    """Queue, on a Redis pipeline, the record of messages about to be sent (id -> paths), until completed."""
    now = time.time()
    pipe.hset(keys.job_pending(job_id),
              mapping={mid: json.dumps({"paths": paths, "at": now}) for mid, paths in messages.items()})
    pipe.expire(keys.job_pending(job_id), ttl_seconds)
    pipe.sadd(keys.PENDING_JOBS, job_id)


def seal_job(client: redis.Redis, job_id: str) -> bool:
    """Say that no more images will be added; the job finishes when the last record is written (or now)."""
    return bool(client.eval(_SEAL_LUA, 1, keys.job(job_id)))


@dataclass(frozen=True)
class JobStatus:
    """A job's progress plus the figures `imgpipe status` shows: rate (images/s) and ETA (seconds)."""

    progress: JobProgress
    kind: str
    started: float | None  # first record written (epoch seconds)
    updated: float | None  # latest record written
    now: float

    @property
    def job_id(self) -> str:
        return self.progress.job_id

    @property
    def total(self) -> int:
        return self.progress.total

    @property
    def done(self) -> int:
        return self.progress.done

    @property
    def failed(self) -> int:
        return self.progress.failed

    @property
    def sealed(self) -> bool:
        return self.progress.sealed

    @property
    def finished(self) -> bool:
        return self.progress.finished is not None

    @property
    def state(self) -> str:
        """enqueuing (not sealed yet), queued (no record yet), running, or done."""
        if self.finished:
            return "done"
        if not self.sealed:
            return "enqueuing" if self.kind == "batch" else "streaming"
        return "running" if self.started is not None else "queued"

    @property
    def rate(self) -> float | None:
        """Images recorded per second since the first record (up to the last one, once finished)."""
        if self.started is None:
            return None
        end = self.updated if self.finished and self.updated is not None else self.now
        elapsed = end - self.started
        completed = self.progress.completed
        if elapsed <= 0:
            return None
        return completed / elapsed

    @property
    def eta(self) -> float | None:
        """Seconds until every enqueued image has a record at the current rate (0 when finished)."""
        if self.finished:
            return 0.0
        rate = self.rate
        if not rate:
            return None
        return self.progress.backlog / rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "state": self.state,
            "kind": self.kind,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "sealed": self.sealed,
            "rate": None if self.rate is None else round(self.rate, 3),
            "eta": None if self.eta is None else round(self.eta, 3),
            "created": self.progress.created,
            "finished": self.progress.finished,
        }


def job_statuses(
    client: redis.Redis, job_ids: Sequence[str] | None = None, limit: int = 100
) -> list[JobStatus]:
    """Status of ``job_ids`` (default: the newest ``limit`` jobs), newest first; expired jobs are left out."""
    ids = recent_job_ids(client, limit) if job_ids is None else list(job_ids)
    now = time.time()
    statuses = [
        JobStatus(progress, kind or "batch", as_float(started), as_float(updated), now)
        for progress, (kind, started, updated) in read_jobs_with(client, ids, ("kind", "started", "updated"))
    ]
    if job_ids is None:
        expired = set(ids) - {s.job_id for s in statuses}
        if expired:
            client.zrem(keys.JOBS, *expired)
    return statuses


def job_status(client: redis.Redis, job_id: str) -> JobStatus:
    """One job's status; ConfigError if there is no such job (or it has expired)."""
    found = job_statuses(client, [job_id])
    if not found:
        raise ConfigError(f"no such job: {job_id!r} (imgpipe status lists the jobs Redis still holds)")
    return found[0]


def iter_records(client: redis.Redis, job_id: str, count: int = 1000) -> Iterator[Record]:
    """A job's records as they are stored (no particular order), read in pages: memory stays flat."""
    for _path, raw in client.hscan_iter(keys.job_results(job_id), count=count):
        yield json.loads(raw)

