"""One message's way through a worker: count the delivery, skip paths already recorded, classify the rest in
shared batches, write the records, and dead-letter a message that keeps failing."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from imgpipe import keys
from imgpipe.errors import RetryableError
from imgpipe.model.engine import Engine
from imgpipe.records import Record, error_record
from imgpipe.worker import metrics
from imgpipe.worker.batcher import Batcher
from imgpipe.worker.store import ResultStore

log = logging.getLogger(__name__)

LOST = "the worker stopped while processing it (killed, crashed or lost its connection)"


@dataclass(frozen=True)
class PipelineLimits:
    max_deliveries: int  # starts of one message before it is dead-lettered
    time_limit: float  # seconds one message may take before it is given back (below the visibility timeout)


class Pipeline:
    """What a task runs; shared by all task threads of one worker process."""

    def __init__(self, engine: Engine, batcher: Batcher, store: ResultStore, limits: PipelineLimits) -> None:
        self.engine = engine
        self.batcher = batcher
        self.store = store
        self.limits = limits

    def process(self, message_id: str, job_id: str, paths: Sequence[str]) -> int:
        """Handle one delivery of a message; returns how many records it wrote.

        Raises on any failure that should give the message back for another try (RetryableError when the
        cause is known to be passing).
        """
        started = time.monotonic()
        delivery = self.store.begin(message_id, job_id, paths)
        if not delivery.job_exists:
            log.warning("message %s: job %r does not exist (expired or never created); dropped", message_id, job_id)
            return 0
        if not delivery.todo:
            self.store.forget(message_id, job_id)  # a redelivered message whose records were all written
            return 0
        if delivery.count > self.limits.max_deliveries:
            reason = delivery.last_error or LOST
            return self._dead_letter(message_id, job_id, delivery.todo, delivery.count, reason)
        with metrics.in_flight(len(delivery.todo)):
            records = self._classify(message_id, delivery.todo, started)
        start = time.perf_counter()
        written = self.store.write(job_id, records, self.engine.model_id)
        metrics.STAGE_SECONDS.labels(stage="write").observe(time.perf_counter() - start)
        self._count(written or [])
        self.store.forget(message_id, job_id)
        return len(written or [])

    def failed(self, message_id: str, exc: BaseException) -> None:
        """Record why a delivery failed (best effort: Redis may be what failed)."""
        try:
            self.store.note_failure(message_id, f"{exc.__class__.__name__}: {exc}")
        except Exception as store_exc:
            log.warning("cannot record the failure of message %s: %s", message_id, store_exc)

    def _classify(self, message_id: str, paths: Sequence[str], started: float) -> list[Record]:
        futures = self.batcher.submit(paths, source=message_id)
        timeout = max(0.0, self.limits.time_limit - (time.monotonic() - started))
        _done, pending = concurrent.futures.wait(futures, timeout=timeout)
        if pending:
            for future in pending:
                future.cancel()
            raise RetryableError(
                f"{len(pending)} of {len(paths)} images not classified within the time limit of "
                f"{self.limits.time_limit:.0f} s (a fraction of IMGPIPE_VISIBILITY_TIMEOUT)"
            )
        return [future.result() for future in futures]

    def _dead_letter(self, message_id: str, job_id: str, paths: Sequence[str], count: int, reason: str) -> int:
        model = self.engine.model_id
        message = f"gave up after {count - 1} deliveries: {reason}"
        records = [error_record(path, message, model, "dead_letter") for path in paths]
        entry = {
            "job": job_id,
            "message_id": message_id,
            "paths": list(paths),
            "reason": reason,
            "deliveries": count - 1,
            "at": time.time(),
        }
        written = self.store.write(job_id, records, model, dead_letter=entry)
        self._count(written or [])
        if written:
            metrics.DEAD_LETTERS.inc()
            log.error(
                "message %s of job %s dead-lettered to %s after %d deliveries (%d images failed): %s",
                message_id,
                job_id,
                keys.DEAD_LETTER,
                count - 1,
                len(written),
                reason,
            )
        self.store.forget(message_id, job_id)
        return len(written or [])

    @staticmethod
    def _count(written: Sequence[Record]) -> None:
        for record in written:
            metrics.IMAGES.labels(status=record["status"]).inc()
            if record["status"] != "ok":
                metrics.ERRORS.labels(reason=record.get("reason", "internal")).inc()
