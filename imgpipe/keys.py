"""Every Redis key, the queue name and the task name: the one place they are spelled."""

from __future__ import annotations

PREFIX = "imgpipe"

# Celery task name the producer sends by (it never imports the worker).
TASK_CLASSIFY = "imgpipe.classify_chunk"

# Set of all job ids, newest scored highest (score: creation time).
JOBS = f"{PREFIX}:jobs"
# Dead-lettered messages: list of JSON {"job", "message_id", "paths", "reason", "deliveries", "at"}.
DEAD_LETTER = f"{PREFIX}:deadletter"


def job(job_id: str) -> str:
    """Hash: total, done, failed, created, finished, model, roots, sealed (1 once enqueueing is complete),
    kind ("batch" or "stream"), started and updated (epoch seconds of the first and latest record written)."""
    return f"{PREFIX}:job:{job_id}"


def job_results(job_id: str) -> str:
    """Hash: path -> record JSON. HSETNX makes each path's record write-once (idempotent redelivery)."""
    return f"{PREFIX}:job:{job_id}:results"


def deliveries(message_id: str) -> str:
    """Hash: count (times one message was started) and error (why the last start failed), for dead-lettering."""
    return f"{PREFIX}:deliveries:{message_id}"
