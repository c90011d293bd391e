"""kombu's Redis transport with a gate: anything in the queue that is not an imgpipe message is dropped there.

A raw ``LPUSH imgpipe hello`` (not JSON), a JSON value that is not a kombu message, a message in another
content type (pickle) or for another task is logged, counted in ``imgpipe_messages_refused_total{reason}`` and
dropped (BRPOP has already taken it off the queue), and the worker keeps serving. Registered for the worker
process only (``install``), under the ``redis`` and ``rediss`` schemes.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from imgpipe import keys
from imgpipe.worker import metrics

log = logging.getLogger(__name__)


def refuse(reason: str, detail: str) -> None:
    metrics.REFUSED.labels(reason=reason).inc()
    log.error("refused a message (%s): %s; dropped", reason, detail[:300])


def check_payload(payload: Any) -> str | None:
    """Why a decoded queue item is not an imgpipe message (the refusal reason), or None."""
    if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
        return "junk"
    if "body" not in payload or not isinstance(payload.get("headers", {}), dict):
        return "junk"
    if payload.get("content-type") != "application/json":
        return "content_type"
    task = payload.get("headers", {}).get("task")
    if task != keys.TASK_CLASSIFY:
        return "unknown_task"
    return None


def _describe(message: Any, reason: str) -> str:
    if reason == "content_type":
        return f"content type {message.get('content-type')!r} (only application/json is accepted)"
    if reason == "unknown_task":
        return f"task {message.get('headers', {}).get('task')!r}"
    return repr(message)[:200]


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except ValueError as exc:  # not JSON (or not UTF-8): json/bytes_to_str refused it before delivery
            refuse("junk", f"not a JSON message: {exc}")
            return True


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        reason = check_payload(message)
        if reason is not None:
            refuse(reason, _describe(message, reason))
            return
        super()._deliver(message, queue)


def install() -> None:
    """Make ``redis://`` and ``rediss://`` use this transport in this process (the worker)."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["rediss"] = f"{__name__}:Transport"
