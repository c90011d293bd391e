"""The one Celery task, a thin wrapper around the worker's pipeline: validate, run, give back on failure."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject

from imgpipe import keys
from imgpipe.messages import VERSION_HEADER, Limits, Refused, parse
from imgpipe.worker import metrics
from imgpipe.worker.consumer import Runner
from imgpipe.worker.pipeline import GiveBack, Pipeline

log = logging.getLogger(__name__)


def message_version(request: Any) -> Any:
    """The ``imgpipe_v`` header of the message being run (None: version 1)."""
    headers = getattr(request, "headers", None)
    if isinstance(headers, dict) and VERSION_HEADER in headers:
        return headers[VERSION_HEADER]
    return getattr(request, VERSION_HEADER, None)


def register(app: Celery, pipeline: Pipeline, limits: Limits, runner: Runner) -> Task:
    """Register ``imgpipe.classify_chunk`` on ``app``: the worker's consumer hands its deliveries to ``runner``
    (worker/consumer.py: grouped, not one per pool thread); the body below runs a message on its own when the
    task is called directly (``apply``)."""

    @app.task(
        name=keys.TASK_CLASSIFY,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        Strategy="imgpipe.worker.consumer:strategy",
    )
    def classify_chunk(self: Task, *args: Any, **kwargs: Any) -> int:
        """Classify one message's paths and write their records."""
        try:
            message = parse(args, kwargs, message_version(self.request), limits)
        except Refused as exc:  # before any Redis write; dropped (acknowledged), never retried
            metrics.REFUSED.labels(reason=exc.reason).inc()
            log.error("message %s refused (%s): %s; dropped", self.request.id, exc.reason, exc.detail)
            return 0
        try:
            return pipeline.process(self.request.id, message)
        except GiveBack as exc:
            raise Reject(str(exc), requeue=True) from exc
        except Exception as exc:  # give it back; charged only if it ran alone (docs/reliability.md)
            log.warning("message %s failed, giving it back: %s: %s", self.request.id, exc.__class__.__name__, exc)
            pipeline.failed(self.request.id, message.job_id, exc)
            raise Reject(str(exc), requeue=True) from exc

    classify_chunk.runner = runner  # read by the Strategy
    return classify_chunk
