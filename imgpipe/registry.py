"""The worker registry: each worker process keeps a heartbeat key fresh in Redis; one function lists the live ones.

Celery's own heartbeat, gossip and mingle stay off (they cost a broadcast per worker per second); this is one
small key per process with a short TTL, so a worker that dies (kill -9, a lost machine) vanishes from the list
by itself within ``ttl`` seconds. ``imgpipe status``, the health check and the reconciler build on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import redis

from imgpipe import defaults, keys
from imgpipe.untrusted import loads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker process says about itself in each heartbeat (epoch seconds for times)."""

    id: str  # imgpipe-<pid>@<host>, as Celery names it
    host: str
    pid: int
    model: str  # model id, name@sha-prefix
    device: str
    queues: tuple[str, ...]
    started: float
    seen: float = 0.0  # time of this heartbeat
    progress: float = 0.0  # last time the worker finished a batch or an image (0: never)
    busy: int = 0  # images submitted and not yet resolved
    connected: bool = True  # its consumer holds a broker connection
    extra: dict[str, Any] = field(default_factory=dict)
    work_since: float = 0.0  # when its images in hand last went from none to some (imgpipe/health.py)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "queues": list(self.queues)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo | None:
        """The record, or None for anything that is not a heartbeat (never an exception). Fields this version
        does not know are ignored, so that a newer worker's heartbeat still reads during a rolling upgrade."""
        try:
            data = loads(raw)
            known = {f.name for f in fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
            data["queues"] = tuple(data.get("queues", ()))
            return cls(**data)
        except (ValueError, TypeError, AttributeError):
            return None


def write_heartbeat(client: redis.Redis, info: WorkerInfo, ttl: float = defaults.HEARTBEAT_TTL_S) -> None:
    """Publish ``info`` for ``ttl`` seconds (one pipelined round trip)."""
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.worker(info.id), info.to_json(), px=int(ttl * 1000))
    pipe.zadd(keys.WORKERS, {info.id: info.seen})
    pipe.execute()


def remove_worker(client: redis.Redis, worker_id: str) -> None:
    """Take a worker off the list at once (a clean shutdown)."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.worker(worker_id))
    pipe.zrem(keys.WORKERS, worker_id)
    pipe.execute()


def live_workers(client: redis.Redis, ttl: float = defaults.HEARTBEAT_TTL_S) -> list[WorkerInfo]:
    """Every worker whose heartbeat has not expired, sorted by id; forgets the ones that have."""
    now = time.time()
    client.zremrangebyscore(keys.WORKERS, "-inf", now - 10 * ttl)
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in client.zrange(keys.WORKERS, 0, -1)]
    if not ids:
        return []
    found = []
    for worker_id, raw in zip(ids, client.mget([keys.worker(i) for i in ids]), strict=True):
        info = WorkerInfo.from_json(raw) if raw is not None else None
        if info is None:
            client.zrem(keys.WORKERS, worker_id)
        else:
            found.append(info)
    return sorted(found, key=lambda w: w.id)


class Heartbeat:
    """A daemon thread that writes this worker's record every ``interval`` seconds.

    ``status`` returns the changing fields (progress, busy, connected) each time; a failed write (Redis
    down) is logged once and retried at the next beat. ``close`` removes the record.
    """

    def __init__(
        self,
        client: redis.Redis,
        info: WorkerInfo,
        status: Callable[[], dict[str, Any]] | None = None,
        interval: float = defaults.HEARTBEAT_INTERVAL_S,
        ttl: float = defaults.HEARTBEAT_TTL_S,
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.info = info
        self.status = status or (lambda: {})
        self.interval = interval
        self.ttl = ttl
        self.on_beat = on_beat  # more to keep fresh with each beat (the worker's message leases)
        self.last_ok: float | None = None  # when a heartbeat last reached Redis
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgpipe-heartbeat", daemon=True)
        self._failing = False

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> bool:
        """Write one heartbeat now; True when it reached Redis."""
        self.info = replace(self.info, seen=time.time(), **self.status())
        try:
            write_heartbeat(self.client, self.info, self.ttl)
            if self.on_beat is not None:
                self.on_beat()
        except (redis.RedisError, OSError) as exc:
            if not self._failing:
                log.warning("heartbeat to Redis failed (retrying every %.0f s): %s", self.interval, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat to Redis restored")
        self._failing = False
        self.last_ok = time.time()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 5)
        with contextlib.suppress(redis.RedisError, OSError):  # else it expires by itself
            remove_worker(self.client, self.info.id)


def queues_served(workers: Sequence[WorkerInfo]) -> set[str]:
    """Every queue at least one live worker consumes."""
    return {queue for worker in workers for queue in worker.queues}
