"""Sends again the messages that the broker lost, so that no image of a job is ever silently dropped.

Celery's Redis transport takes a message with BRPOP and only then records it as unacknowledged: a worker
killed between the two loses the message (celery/celery#7950, kombu#305), and so can a warm shutdown
(celery/celery#4354). The producer records every message it sends in the job's pending hash, and a worker
removes it once the message's records are written. When the queue and the unacknowledged set are both empty,
yet a pending message is older than the visibility timeout, no copy of it exists anywhere: it is sent again
under the same id (its delivery count goes on, so a message that keeps failing still ends dead-lettered).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from imgpipe import keys

log = logging.getLogger(__name__)

# kombu's Redis transport's own key for messages taken and not yet acknowledged (all queues of the database).
KOMBU_UNACKED = "unacked"
# Seconds between the two looks at an empty broker: long enough for any fetch to be recorded as unacknowledged.
SETTLE_S = 1.0

Resend = Callable[[str, list[str], str], None]  # (job id, paths, message id)


class Sweeper:
    """Looks for lost messages every ``interval`` seconds (one worker at a time, under a Redis lock)."""

    def __init__(
        self, client: redis.Redis, queue: str, grace_s: float, resend: Resend, interval_s: float | None = None
    ) -> None:
        self.client = client
        self.queue = queue
        self.grace_s = grace_s
        self.resend = resend
        self.interval_s = interval_s if interval_s is not None else min(60.0, max(2.0, grace_s / 2))
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imgpipe-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except redis.RedisError as exc:
                log.warning("looking for lost messages failed: %s", exc)

    def _broker_empty(self) -> bool:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.queue)
        pipe.hlen(KOMBU_UNACKED)
        queued, unacked = pipe.execute()
        return int(queued) == 0 and int(unacked) == 0

    def sweep(self) -> int:
        """Send again the pending messages that exist nowhere in the broker; returns how many."""
        lock_ttl = max(1, int(self.interval_s))
        if not self.client.set(keys.SWEEP_LOCK, self.owner, nx=True, ex=lock_ttl):
            return 0
        if not self._broker_empty() or self._stop.wait(SETTLE_S) or not self._broker_empty():
            return 0  # messages still queued or in flight: the visibility timeout covers those
        resent = 0
        cutoff = time.time() - self.grace_s
        for raw_job in self.client.smembers(keys.PENDING_JOBS):
            job_id = raw_job.decode() if isinstance(raw_job, bytes) else str(raw_job)
            pending = self.client.hgetall(keys.job_pending(job_id))
            if not pending:
                self.client.srem(keys.PENDING_JOBS, job_id)
                continue
            resent_here = 0
            for raw_id, raw_entry in pending.items():
                entry = json.loads(raw_entry)
                if float(entry.get("at", 0)) > cutoff:
                    continue
                message_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                entry["at"] = time.time()
                self.client.hset(keys.job_pending(job_id), message_id, json.dumps(entry))
                self.resend(job_id, list(entry["paths"]), message_id)
                resent_here += 1
            if resent_here:
                log.warning("job %s: sent %d lost messages again", job_id, resent_here)
            resent += resent_here
        return resent
