"""The job record in Redis, shared by producers, workers, status and the exporter.

Create, add to the total, seal, the job-finishing Lua that workers run after each write, and the readers:
progress, rate and ETA, the one recent-rate and drain-time estimate, and the records.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from imgpipe import defaults, keys
from imgpipe.errors import ConfigError
from imgpipe.records import Record
from imgpipe.untrusted import loads

# Jobs read per sample, newest first: bounds the Redis work of one scrape however many jobs are kept.
MAX_JOBS_READ = 10_000
# (imgpipe/defaults.py)
RATE_WINDOW_S = defaults.RATE_WINDOW_S

# Field of the job hash set (epoch seconds) by `imgpipe cancel`: workers skip the job's remaining messages.
CANCELLED = "cancelled"
_FIELDS = ("total", "done", "failed", "created", "finished", "sealed", CANCELLED)
# A rate needs at least this many seconds between its first and last observation to mean anything.
MIN_RATE_SPAN_S = 1.0


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
    cancelled: float | None = None  # when `imgpipe cancel` stopped it (it is also finished then)

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
            cancelled=as_float(raw[CANCELLED]),
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
    queue_job_reads(pipe, job_ids, extra)
    return parse_job_reads(job_ids, pipe.execute())


def queue_job_reads(pipe: Any, job_ids: Sequence[str], extra: Sequence[str] = ()) -> None:
    """Add the reads of ``read_jobs_with`` to ``pipe`` (one HMGET per job), for a caller with more to pipeline."""
    for job_id in job_ids:
        pipe.hmget(keys.job(job_id), [*_FIELDS, *extra])


def parse_job_reads(job_ids: Sequence[str], replies: Sequence[Any]) -> list[tuple[JobProgress, list[str | None]]]:
    """The jobs (and extra fields) from the replies of ``queue_job_reads``, in order; expired jobs left out."""
    jobs = []
    for job_id, values in zip(job_ids, replies, strict=True):
        job = JobProgress.from_hash(job_id, values[: len(_FIELDS)])
        if job is not None:
            jobs.append((job, [as_text(v) for v in values[len(_FIELDS) :]]))
    return jobs


def read_jobs(client: Any, job_ids: Sequence[str] | None = None, limit: int = MAX_JOBS_READ) -> list[JobProgress]:
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
        return self.rate_of(None if job_id is None else [job_id])

    def rate_of(self, job_ids: Iterable[str] | None) -> float | None:
        """Images per second of the jobs ``job_ids`` together (None: all jobs), as ``rate``."""
        if len(self._samples) < 2:
            return None
        (t0, old), (t1, new) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0:
            return None
        ids = new.keys() if job_ids is None else job_ids
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


# A pin: a model id, ``name@`` plus the first 12 hex digits of the model's sha256 (docs/models.md).
PIN_PATTERN = re.compile(r"^[^@\s]{1,200}@[0-9a-f]{12}$")


def check_pin(pin: str) -> str:
    """ConfigError unless ``pin`` is a model id ``name@sha12`` (as `imgpipe model info` prints it)."""
    if not PIN_PATTERN.match(pin):
        raise ConfigError(
            f"--model {pin!r} is not a model id; give name@ and the first 12 hex digits of its sha256 "
            "(`imgpipe model info FILE` prints it)"
        )
    return pin


def pin_queue(pin: str | None, default: str) -> str:
    """The queue of a job pinned to ``pin`` (keys.model_queue of its sha prefix); ``default`` when unpinned."""
    return keys.model_queue(pin.rsplit("@", 1)[1]) if pin else default


def job_queue(client: redis.Redis, job_id: str, default: str) -> str:
    """The queue a job's messages go to (and are sent again to): by its ``pin`` field."""
    return pin_queue(as_text(client.hget(keys.job(job_id), "pin")), default)


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

_SEAL_LUA = (
    FINISH_IF_COMPLETE_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'sealed', '1')
finish_if_complete(KEYS[1], now_string())
return 1
"""
)


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
    pin: str | None = None,
) -> str:
    """Create an empty, unsealed job and return its id; ConfigError if the id is taken. ``pin``: the model id
    every record must carry (its messages go to that model's queue)."""
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}; valid: {', '.join(KINDS)}")
    job_id = check_job_id(job_id) if job_id is not None else new_job_id()
    key = keys.job(job_id)
    now = time.time()
    if not client.hsetnx(key, "created", f"{now:.6f}"):
        raise ConfigError(f"job {job_id!r} already exists; choose another --job id (`imgpipe status` lists jobs)")
    pipe = client.pipeline(transaction=True)
    fields: dict[str | bytes, bytes | float | int | str] = {
        "total": 0,
        "done": 0,
        "failed": 0,
        "sealed": 0,
        "kind": kind,
    }
    fields["roots"] = json.dumps(list(roots))
    if pin:
        fields["pin"] = fields["model"] = pin
    pipe.hset(key, mapping=fields)
    pipe.expire(key, ttl_seconds)
    pipe.zadd(keys.JOBS, {job_id: now})
    pipe.execute()
    return job_id


def add_to_total(pipe: Any, job_id: str, count: int, ttl_seconds: int) -> None:
    """Queue, on a Redis pipeline, the increase of a job's total by ``count`` images about to be enqueued."""
    pipe.hincrby(keys.job(job_id), "total", count)
    pipe.expire(keys.job(job_id), ttl_seconds)


def add_pending(pipe: Any, job_id: str, messages: dict[str, list[str]], ttl_seconds: int) -> None:
    """Queue, on a Redis pipeline, the record of messages about to be sent (id -> paths), until completed, and
    their send time in the job's time index (``keys.job_pending_times``)."""
    now = time.time()
    pipe.hset(
        keys.job_pending(job_id),
        mapping={mid: json.dumps({"paths": paths, "at": now}) for mid, paths in messages.items()},
    )
    pipe.zadd(keys.job_pending_times(job_id), dict.fromkeys(messages, now))
    pipe.expire(keys.job_pending(job_id), ttl_seconds)
    pipe.expire(keys.job_pending_times(job_id), ttl_seconds)
    pipe.sadd(keys.PENDING_JOBS, job_id)


def seal_job(client: redis.Redis, job_id: str) -> bool:
    """Say that no more images will be added; the job finishes when the last record is written (or now)."""
    return bool(client.eval(_SEAL_LUA, 1, keys.job(job_id)))


def is_cancelled(cancelled_field: Any) -> bool:
    """The skip rule for workers: True when a job hash's ``cancelled`` field (an HGET/HMGET reply: bytes, str
    or None) says the job was cancelled. A worker that takes a message of such a job writes nothing for it and
    acknowledges it, so a cancelled job's remaining messages drain from the queue without work."""
    return as_float(as_text(cancelled_field)) is not None


# KEYS: job hash, pending hash, pending-jobs set, pending time index. ARGV: job id.
# Returns 0 when there is no such job, 1 when cancelled now, 2 when it had finished already (left as it was).
_CANCEL_LUA = (
    FINISH_IF_COMPLETE_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'finished') == 1 then return 2 end
local now = now_string()
redis.call('HSET', KEYS[1], 'cancelled', now, 'sealed', '1')
redis.call('HSETNX', KEYS[1], 'finished', now)
redis.call('DEL', KEYS[2], KEYS[4])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""
)


def cancel_job(client: redis.Redis, job_id: str) -> int:
    """Mark a job cancelled (and so finished): workers skip its remaining messages (``is_cancelled``), the
    lost-message sweeper forgets them, and its records so far stay readable.

    Returns 1 when cancelled now, 2 when the job had already finished (nothing changed); ConfigError when
    there is no such job.
    """
    job_keys = (keys.job(job_id), keys.job_pending(job_id), keys.PENDING_JOBS, keys.job_pending_times(job_id))
    outcome = int(client.eval(_CANCEL_LUA, len(job_keys), *job_keys, job_id))
    if outcome == 0:
        raise ConfigError(f"no such job: {job_id!r} (imgpipe status lists the jobs Redis still holds)")
    return outcome


def delete_job(client: redis.Redis, job_id: str) -> int:
    """Remove a job and everything Redis keeps for it: its hash, records, pending messages with their delivery
    counters, its dead letters and its place in the job list. Returns the number of keys and entries removed.

    Messages still queued for it are dropped by the workers that take them (their job does not exist).
    """
    pending = [as_text(m) or "" for m in client.hkeys(keys.job_pending(job_id))]
    dead = [raw for raw in client.lrange(keys.DEAD_LETTER, 0, -1) if _dead_letter_job(raw) == job_id]
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.job(job_id), keys.job_results(job_id), keys.job_pending(job_id), keys.job_pending_times(job_id))
    if pending:
        pipe.delete(*(keys.deliveries(m) for m in pending))
    pipe.zrem(keys.JOBS, job_id)
    pipe.srem(keys.PENDING_JOBS, job_id)
    for raw in dead:
        pipe.lrem(keys.DEAD_LETTER, 1, raw)
    replies = pipe.execute()
    return sum(int(r) for r in replies)


def _dead_letter_job(raw: Any) -> str | None:
    try:
        entry = loads(raw)
    except ValueError:
        return None
    return entry.get("job") if isinstance(entry, dict) else None


@dataclass(frozen=True)
class JobStatus:
    """A job's progress plus the figures `imgpipe status` shows: rate (images/s) and ETA (seconds)."""

    progress: JobProgress
    kind: str
    started: float | None  # first record written (epoch seconds)
    updated: float | None  # latest record written
    now: float
    pin: str | None = None  # the model id the job is pinned to (None: any worker's model)

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
    def cancelled(self) -> bool:
        return self.progress.cancelled is not None

    @property
    def state(self) -> str:
        """enqueuing (not sealed yet), queued (no record yet), running, done, or cancelled."""
        if self.cancelled:
            return "cancelled"
        if self.finished:
            return "done"
        if not self.sealed:
            return "enqueuing" if self.kind == "batch" else "streaming"
        return "running" if self.started is not None else "queued"

    @property
    def rate(self) -> float | None:
        """Images recorded per second between the first and the latest record, the span workers were writing
        this job's records; None until that span is at least MIN_RATE_SPAN_S (a job done in one batch has no
        meaningful rate, only a duration: ``took``). A stall does not dilute it: see ``idle``."""
        if self.started is None or self.updated is None:
            return None
        span = self.updated - self.started
        if span < MIN_RATE_SPAN_S:
            return None
        return self.progress.completed / span

    @property
    def took(self) -> float | None:
        """Seconds from creation to finish (None while running)."""
        if self.progress.finished is None:
            return None
        return max(0.0, self.progress.finished - self.progress.created)

    @property
    def idle(self) -> float:
        """Seconds since this job's latest record (since its creation when it has none yet)."""
        return max(0.0, self.now - (self.updated or self.progress.created))

    @property
    def eta(self) -> float | None:
        """Seconds until every enqueued image has a record at ``rate`` (0 when done; None when cancelled or
        without a rate)."""
        if self.cancelled:
            return None
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
            "cancelled": self.progress.cancelled,
            "took": None if self.took is None else round(self.took, 3),
            "pin": self.pin,
        }


def job_statuses(client: redis.Redis, job_ids: Sequence[str] | None = None, limit: int = 100) -> list[JobStatus]:
    """Status of ``job_ids`` (default: the newest ``limit`` jobs), newest first; expired jobs are left out."""
    ids = recent_job_ids(client, limit) if job_ids is None else list(job_ids)
    now = time.time()
    statuses = [
        JobStatus(progress, kind or "batch", as_float(started), as_float(updated), now, pin or None)
        for progress, (kind, started, updated, pin) in read_jobs_with(
            client, ids, ("kind", "started", "updated", "pin")
        )
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


def failure_reasons(client: redis.Redis, job_id: str, count: int = 1000) -> list[tuple[str, int, str]]:
    """Why a job's images failed: (reason, images, one example message), most frequent first.

    Reads the job's records in pages and decodes only the error ones (cost grows with the job's size, so the
    CLI calls it only when ``failed`` > 0).
    """
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    for _path, raw in client.hscan_iter(keys.job_results(job_id), count=count):
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if '"error"' not in text:  # ok records never mention it
            continue
        record = json.loads(raw)
        if record.get("status") == "ok":
            continue
        reason = str(record.get("reason") or "internal")
        counts[reason] = counts.get(reason, 0) + 1
        examples.setdefault(reason, str(record.get("error", "")))
    return sorted(((r, n, examples[r]) for r, n in counts.items()), key=lambda item: (-item[1], item[0]))
