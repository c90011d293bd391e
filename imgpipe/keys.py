"""Every Redis key, the queue name and the task name: the one place they are spelled."""

from __future__ import annotations

PREFIX = "imgpipe"

# Celery task name the producer sends by (it never imports the worker).
TASK_CLASSIFY = "imgpipe.classify_chunk"

# Set of all job ids, newest scored highest (score: creation time).
JOBS = f"{PREFIX}:jobs"
# Jobs that have messages not yet completed (see job_pending); the reconciler looks only at these.
PENDING_JOBS = f"{PREFIX}:pending-jobs"
# Lock so that one worker at a time looks for lost messages (value: who holds it; expires by itself).
SWEEP_LOCK = f"{PREFIX}:sweep-lock"
# Sorted set of worker ids, scored by their latest heartbeat (epoch seconds); see imgpipe/registry.py.
WORKERS = f"{PREFIX}:workers"
# Sorted set of message ids leased by a worker, scored by the lease's expiry (Redis server time, seconds).
LEASES = f"{PREFIX}:leases"
# Dead-lettered messages: list of JSON {"job", "message_id", "paths", "reason", "deliveries", "at"}.
DEAD_LETTER = f"{PREFIX}:deadletter"


def job(job_id: str) -> str:
    """Hash: total, done, failed, created, finished, model, roots, sealed (1 once enqueueing is complete),
    kind ("batch" or "stream"), started and updated (epoch seconds of the first and latest record written)."""
    return f"{PREFIX}:job:{job_id}"


def job_results(job_id: str) -> str:
    """Hash: path -> record JSON. HSETNX makes each path's record write-once (idempotent redelivery)."""
    return f"{PREFIX}:job:{job_id}:results"


def job_pending(job_id: str) -> str:
    """Hash: message id -> JSON {"paths", "at"} of each message sent and not yet completed, so that a message
    the broker loses (a worker killed between taking it and recording it as unacknowledged) can be sent again."""
    return f"{PREFIX}:job:{job_id}:pending"


def job_pending_times(job_id: str) -> str:
    """Sorted set: message id -> its pending entry's "at" (sent or re-sent), beside ``job_pending``: the
    reconciler reads only the messages older than its cutoff, not the whole pending hash (a job's backlog)."""
    return f"{PREFIX}:job:{job_id}:pending-at"


def deliveries(message_id: str) -> str:
    """Hash: count (deliveries charged), error (why the last charged one failed), suspect (1: runs alone next),
    and while leased: owner (worker id), state (held | working), alone (1 | 0), job. See imgpipe/leases.py."""
    return f"{PREFIX}:deliveries:{message_id}"


def worker(worker_id: str) -> str:
    """String (JSON WorkerInfo) with a short TTL, refreshed by the worker's heartbeat; gone when it dies."""
    return f"{PREFIX}:worker:{worker_id}"


def model_queue(sha12: str) -> str:
    """List (a kombu queue): messages of jobs pinned to the model whose sha256 starts with ``sha12`` (12 hex
    digits; never the user's model name). No other imgpipe key and no default queue name has this form."""
    return f"{PREFIX}:model:{sha12}"
