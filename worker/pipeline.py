"""One message's way through a worker: take its lease, skip paths already recorded, wait for a work slot,
classify the rest in shared batches, write the records, and dead-letter a message charged too often.

Accounting (docs/reliability.md): a delivery is charged only to a message that was working alone when its
worker died or its batch failed; one that was working beside others becomes a suspect and runs alone next.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imgpipe import keys
from imgpipe.errors import RetryableError
from imgpipe.jobs import as_text
from imgpipe.leases import Leases
from imgpipe.messages import Message, check_path, native_path
from imgpipe.model.engine import Engine
from imgpipe.records import Record, error_record
from imgpipe.worker import metrics
from imgpipe.worker.batcher import Batcher
from imgpipe.worker.store import ResultStore

log = logging.getLogger(__name__)

LOST = "the worker stopped while processing it (killed, crashed or lost its connection)"


@dataclass(frozen=True)
class PipelineLimits:
    max_deliveries: int  # charged deliveries of one message before it is dead-lettered
    time_limit: float  # seconds a working message may take before it is given back (uncharged)


class GiveBack(Exception):
    """The message was not started (shutting down): give it back to the queue at once, uncharged."""


class TooSlow(RetryableError):
    """A working message passed its time limit: the records done are written, the rest given back uncharged
    (slowness is never charged, and every delivery makes progress)."""

    def __init__(self, message: str, done: list[Record]) -> None:
        super().__init__(message)
        self.done = done


class WorkGate:
    """Bounds the images in decode and inference per process; first come, first served; one may take it all.

    ``acquire(n)`` waits until ``n`` of ``capacity`` units are free and every earlier caller is served; a
    suspect asks for the whole capacity and so runs alone. Returns False if ``stopping`` is set meanwhile.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.used = 0
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    def acquire(self, n: int, stopping: threading.Event) -> bool:
        n = min(max(1, n), self.capacity)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket and self.used + n <= self.capacity):
                    if stopping.is_set():
                        return False
                    self._cond.wait(0.2)
                self.used += n
                return True
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def release(self, n: int) -> None:
        n = min(max(1, n), self.capacity)
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class Pipeline:
    """What a task runs; shared by all task threads of one worker process."""

    def __init__(
        self,
        engine: Engine,
        batcher: Batcher,
        store: ResultStore,
        leases: Leases,
        limits: PipelineLimits,
        gate: WorkGate,
        redirect: Callable[[str, list[str], str], None] | None = None,
    ) -> None:
        self.engine = engine
        # Sends a message of a job pinned to another model to that model's queue (job id, paths, message id).
        self.redirect = redirect
        self.batcher = batcher
        self.store = store
        self.leases = leases
        self.limits = limits
        self.gate = gate
        self.stopping = threading.Event()  # set on SIGTERM: messages not started are given back

    def process(self, message_id: str, message: Message) -> int:
        """Handle one delivery of a validated message; returns how many records it wrote.

        Raises GiveBack (not started: requeue), or any other exception after ``failed`` (requeue).
        """
        job_id = message.job_id
        if self.redirect is not None and self._redirected(message_id, message):
            return 0
        begun = self.leases.begin(message_id, job_id, message.paths)
        if begun.state == "no_job":
            log.warning("message %s: job %r does not exist (expired or never created); dropped", message_id, job_id)
            return 0
        if begun.state == "duplicate":
            metrics.DUPLICATES.inc()
            log.info("message %s: another copy is leased by a live worker; this copy dropped", message_id)
            return 0
        if begun.cancelled:  # `imgpipe cancel`: its remaining messages drain without work
            self.leases.finish(message_id, job_id)
            return 0
        todo = [message.paths[i] for i in begun.todo]
        if not todo:
            self.leases.finish(message_id, job_id)  # a copy of a message whose records were all written
            return 0
        dead = 0
        if begun.count >= self.limits.max_deliveries:
            if begun.culprit is None or begun.culprit not in todo:
                return self._dead_letter(message_id, job_id, todo, begun.count, begun.last_error or LOST, True)
            # Isolated down to one image: only it is dead-lettered; the rest of the message goes on, alone.
            dead = self._dead_letter(message_id, job_id, [begun.culprit], begun.count, begun.last_error or LOST)
            todo.remove(begun.culprit)
        model = self.engine.model_id
        refused: list[Record] = []
        good: list[str] = []
        for path in todo:
            why = check_path(path, begun.roots)
            if why is None:
                good.append(path)
            else:
                refused.append(_error(path, why[1], model, why[0]))
        alone = begun.suspect or dead > 0
        weight = self.gate.capacity if alone else len(good)
        records: list[Record] = []
        if good:
            if not self.gate.acquire(weight, self.stopping):
                self.leases.give_back(message_id, job_id)
                raise GiveBack("shutting down before the message started")
            try:
                self.leases.working(message_id, alone)
                with metrics.in_flight(len(good)):
                    one_by_one = alone  # a suspect: isolated down to the image
                    records = (
                        self._one_by_one(message_id, job_id, good) if one_by_one else self._classify(message_id, good)
                    )
            except TooSlow as exc:
                self._count(self.store.write(job_id, [*exc.done, *refused], model) or [])
                raise
            finally:
                self.gate.release(weight)
        start = time.perf_counter()
        written = self.store.write(job_id, [*records, *refused], model)
        metrics.STAGE_SECONDS.labels(stage="write").observe(time.perf_counter() - start)
        self._count(written or [])
        self.leases.finish(message_id, job_id)
        return len(written or []) + dead

    def _redirected(self, message_id: str, message: Message) -> bool:
        """A message of a job pinned to a model this worker does not serve (taken from the default queue, or
        prefetched from the old model's queue before a reload) is sent to its model's queue, not processed:
        acknowledged here, nothing lost (the records' write-once HSETNX covers any race)."""
        pin = as_text(self.leases.client.hget(keys.job(message.job_id), "pin"))
        mine = self.engine.model_id
        if not pin or pin.rsplit("@", 1)[-1] == mine.rsplit("@", 1)[-1]:
            return False
        assert self.redirect is not None
        self.redirect(message.job_id, list(message.paths), message_id)
        metrics.RESENT.labels(cause="model").inc()
        log.info(
            "message %s: job %s is pinned to %s, this worker serves %s; sent to its queue",
            message_id,
            message.job_id,
            pin,
            mine,
        )
        return True

    def _one_by_one(self, message_id: str, job_id: str, paths: Sequence[str]) -> list[Record]:
        """A suspect, alone: one image at a time, each named before it starts and recorded as it ends, so a
        crash charges the one image in work (the culprit) and loses nothing else."""
        for path in paths:
            self.leases.current(message_id, path)
            records = self._classify(message_id, [path])
            self._count(self.store.write(job_id, records, self.engine.model_id) or [])
        return []

    def failed(self, message_id: str, job_id: str, exc: BaseException) -> None:
        """End the lease of a delivery that failed: charged if it ran alone, else a suspect; slowness is free."""
        failure = "" if isinstance(exc, TooSlow) else f"{exc.__class__.__name__}: {exc}"
        try:
            self.leases.give_back(message_id, job_id, failure or "")
        except Exception as store_exc:  # Redis may be what failed: the lease then expires by itself
            log.warning("cannot give back message %s: %s", message_id, store_exc)

    def _classify(self, message_id: str, paths: Sequence[str]) -> list[Record]:
        started = time.monotonic()
        futures = self.batcher.submit([native_path(p) for p in paths], source=message_id)
        _done, pending = concurrent.futures.wait(futures, timeout=self.limits.time_limit)
        if pending:
            for future in pending:
                future.cancel()
            done = [f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None]
            raise TooSlow(
                f"{len(pending)} of {len(paths)} images not classified within {time.monotonic() - started:.0f} s "
                f"of starting (the time limit, a fraction of IMGPIPE_VISIBILITY_TIMEOUT); {len(done)} recorded",
                done,
            )
        return [future.result() for future in futures]

    def _dead_letter(
        self, message_id: str, job_id: str, paths: Sequence[str], count: int, reason: str, finish: bool = False
    ) -> int:
        model = self.engine.model_id
        message = f"gave up after {count} deliveries: {reason}"
        records = [_error(path, message, model, "dead_letter") for path in paths]
        entry = {
            "job": job_id,
            "message_id": message_id,
            "paths": list(paths),
            "reason": reason,
            "deliveries": count,
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
                count,
                len(written),
                reason,
            )
        if finish:
            self.leases.finish(message_id, job_id)
        return len(written or [])

    @staticmethod
    def _count(written: Sequence[Record]) -> None:
        for record in written:
            metrics.IMAGES.labels(status=record["status"]).inc()
            if record["status"] != "ok":
                metrics.ERRORS.labels(reason=record.get("reason", "internal")).inc()


def _error(path: str, error: str, model: str, reason: str) -> Record:
    """An error record for a path already in its text form (kept as it came, whatever it holds)."""
    record = error_record("", error, model, reason)
    record["path"] = path
    return record
