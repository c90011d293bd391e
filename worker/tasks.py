"""The one Celery task, a thin wrapper around the worker's pipeline."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject

from imgpipe import keys
from imgpipe.worker.pipeline import Pipeline

log = logging.getLogger(__name__)


def register(app: Celery, pipeline: Pipeline) -> Task:
    """Register ``imgpipe.classify_chunk`` on ``app``, running ``pipeline`` (one per process)."""

    @app.task(name=keys.TASK_CLASSIFY, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def classify_chunk(self: Task, job_id: Any, paths: Any) -> int:
        """Classify one message's paths and write their records; Celery acknowledges when this returns."""
        if not (isinstance(job_id, str) and isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
            raise Reject("malformed message: expected args [job_id: str, paths: list[str]]", requeue=False)
        try:
            return pipeline.process(self.request.id, job_id, paths)
        except Exception as exc:  # give it back; after IMGPIPE_MAX_DELIVERIES starts it is dead-lettered
            log.warning("message %s failed, giving it back: %s: %s", self.request.id, exc.__class__.__name__, exc)
            pipeline.failed(self.request.id, exc)
            raise Reject(str(exc), requeue=True) from exc

    return classify_chunk
