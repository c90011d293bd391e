"""One message's way through a worker: take its lease, skip paths already recorded, wait for a work slot,
classify the rest in shared batches, write the records, and dead-letter a message charged too often.

Accounting (docs/reliability.md): a delivery is charged only to a message that was working alone when its
worker died or its batch failed; one that was working beside others becomes a suspect and runs alone next.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imgpipe import keys
from imgpipe.errors import RetryableError
from imgpipe.leases import Begun, Leases
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


@dataclass(frozen=True)
class Item:
    """One delivery of a validated message, as the group consumer hands it over."""

    message_id: str
    message: Message
    received: float  # time.monotonic() of its receipt: where its images' latency starts
    sent: float | None = None  # epoch seconds of its send by the producer (imgpipe_sent header), if it says


@dataclass
class Work:
    """A leased message's part in a group: the paths to classify, its refused paths' records, its outcome."""

    index: int
    item: Item
    good: list[str]
    refused: list[Record]
    records: list[Record] = field(default_factory=list)
    error: BaseException | None = None


# What the group consumer does with each delivery: ACKED (acknowledged in the group's last round trip),
# ACK (acknowledge it), REQUEUE (give it back to the queue), ALONE (run it alone with ``process``, lease taken),
# WORK (leased: for ``work_group``).
ACKED, ACK, REQUEUE, ALONE, WORK = "acked", "ack", "requeue", "alone", "work"


@dataclass(frozen=True)
class Verdict:
    kind: str
    begun: Begun | None = None  # ALONE: its lease
    work: Work | None = None  # WORK: what to classify


# Adds the acknowledgements of the given items to a pipeline (the group's last round trip).
QueueAcks = Callable[[Any, Sequence[int]], None]


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
    ``holders`` counts the callers between acquire and release (the groups in decode and inference);
    ``on_release`` is called after each release (the group consumer: a group waiting to fill looks again).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.used = 0
        self.holders = 0
        self.on_release: Callable[[], None] | None = None
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
                self.holders += 1
                return True
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def release(self, n: int) -> None:
        n = min(max(1, n), self.capacity)
        with self._cond:
            self.used -= n
            self.holders -= 1
            self._cond.notify_all()
        if self.on_release is not None:
            self.on_release()

    def full_for(self, lanes: int) -> bool:
        """Every lane holds a group (or one holder took the whole capacity): a new group would wait for a core."""
        return self.holders >= lanes or self.used >= self.capacity


class Pipeline:
    """What the worker's lease and group threads run (worker/consumer.py); one per worker process."""

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

    def process(self, message_id: str, message: Message, begun: Begun | None = None) -> int:
        """Handle one delivery of a validated message alone; returns how many records it wrote. ``begun``: its
        lease, when already taken (``process_group`` hands over the messages that must run alone).

        Raises GiveBack (not started: requeue), or any other exception after ``failed`` (requeue).
        """
        job_id = message.job_id
        if begun is None:
            begun = self.leases.begin(message_id, job_id, message.paths)
        if self._dropped(message_id, message, begun):
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
                    records = self._one_by_one(message_id, job_id, good) if one_by_one else self._classify(good)
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

    def lease_group(self, items: Sequence[Item], queue_acks: QueueAcks) -> list[Verdict]:
        """Stage one, as deliveries arrive: take their leases in one Lua call (a message held in the worker is
        leased at once, so the reconciler never takes it for lost). Returns one verdict per item: WORK (with
        its paths split into those to classify and error records for those its job's roots refuse), ALONE (a
        suspect, or at its delivery limit: for ``process``, lease taken), ACKED/ACK (nothing to do: no job, a
        duplicate copy, pinned elsewhere, cancelled, every record written), REQUEUE (shutting down).
        """
        if self.stopping.is_set():  # shutting down: nothing new starts, no lease taken
            return [Verdict(REQUEUE) for _ in items]
        verdicts: list[Verdict] = [Verdict(ACK) for _ in items]
        begun_all = self.leases.begin_many([(it.message_id, it.message.job_id, it.message.paths) for it in items])
        model = self.engine.model_id
        finished: list[int] = []
        for i, (item, begun) in enumerate(zip(items, begun_all, strict=True)):
            if self._dropped(item.message_id, item.message, begun):
                continue
            if begun.cancelled or not begun.todo:  # cancelled, or a copy whose records are all written
                finished.append(i)
            elif begun.suspect or begun.count >= self.limits.max_deliveries:
                verdicts[i] = Verdict(ALONE, begun)
            else:
                good, refused = self._split([item.message.paths[j] for j in begun.todo], begun.roots, model)
                verdicts[i] = Verdict(WORK, work=Work(i, item, good, refused))
        if finished:  # their leases end and they are acknowledged in one round trip
            pipe = self.store.client.pipeline(transaction=False)
            self.leases.finish_many(pipe, [(items[i].message_id, items[i].message.job_id) for i in finished])
            queue_acks(pipe, finished)
            try:
                pipe.execute()
            except Exception as exc:  # Redis failed: given back, their leases end by the rule
                for i in finished:
                    self.failed(items[i].message_id, items[i].message.job_id, exc)
                    verdicts[i] = Verdict(REQUEUE)
            else:
                for i in finished:
                    verdicts[i] = Verdict(ACKED)
        return verdicts

    def work_group(self, work: Sequence[Work], queue_acks: QueueAcks) -> list[Verdict]:
        """Stage two, leased messages together: one Lua call marks them working (after the work gate), their
        images share batches run on this thread (worker/batcher.py), and one pipeline writes their records, ends
        their leases and acknowledges them (``queue_acks`` adds that part). Returns ACKED or REQUEUE per message:
        one not started (shutting down) or that failed is given back, its records so far written, its lease
        ended by the charging rule (docs/reliability.md).
        """
        for index, w in enumerate(work):
            w.index = index
        verdicts: list[Verdict] = [Verdict(ACK) for _ in work]
        weight = sum(len(w.good) for w in work)
        if self.stopping.is_set() or (weight and not self.gate.acquire(weight, self.stopping)):
            for w in work:
                self.leases.give_back(w.item.message_id, w.item.message.job_id)
            return [Verdict(REQUEUE) for _ in work]
        try:
            if weight:
                self.leases.working_many([w.item.message_id for w in work if w.good])
                with metrics.in_flight(weight):
                    self._classify_group(work)
        except Exception as exc:  # Redis failed before the images started: give them all back
            for w in work:
                w.error = exc
        finally:
            if weight:
                self.gate.release(weight)
        self._finish_group([w.item for w in work], work, verdicts, queue_acks, self.engine.model_id)
        return verdicts

    def _split(self, todo: Sequence[str], roots: Sequence[str] | None, model: str) -> tuple[list[str], list[Record]]:
        """The paths that may be read, and error records for those the job's roots refuse."""
        good: list[str] = []
        refused: list[Record] = []
        for path in todo:
            why = check_path(path, roots)
            if why is None:
                good.append(path)
            else:
                refused.append(_error(path, why[1], model, why[0]))
        return good, refused

    def _classify_group(self, work: Sequence[Work]) -> None:
        """Run every message's images on this thread, sharing batches; each message's outcome goes on its
        ``Work`` (an inference failure raises, for ``work_group`` to give them all back)."""
        started = time.monotonic()
        paths = [native_path(p) for w in work for p in w.good]
        received = [w.item.received for w in work for _ in w.good]
        records = self.batcher.run(paths, received, started + self.limits.time_limit)
        at = 0
        for w in work:
            mine, at = records[at : at + len(w.good)], at + len(w.good)
            if len(mine) < len(w.good):
                w.error = _too_slow(len(w.good), mine, started)
            else:
                w.records = mine

    def _finish_group(
        self,
        items: Sequence[Item],
        work: Sequence[Work],
        verdicts: list[Verdict],
        queue_acks: QueueAcks,
        model: str,
    ) -> None:
        """One round trip: write the records, end the leases of the messages done, acknowledge them."""
        pipe = self.store.client.pipeline(transaction=False)
        finished: list[int] = []
        by_job: dict[str, list[Record]] = {}  # one write per job, whatever the number of its messages here
        for w in work:
            if w.error is None:
                by_job.setdefault(w.item.message.job_id, []).extend([*w.records, *w.refused])
                finished.append(w.index)
            else:
                verdicts[w.index] = Verdict(REQUEUE)
                if isinstance(w.error, TooSlow):  # what it did is kept
                    by_job.setdefault(w.item.message.job_id, []).extend([*w.error.done, *w.refused])
        reads = [self.store.queue_write(pipe, job_id, records, model) for job_id, records in by_job.items()]
        self.leases.finish_many(pipe, [(items[i].message_id, items[i].message.job_id) for i in finished])
        acks = [i for i, verdict in enumerate(verdicts) if verdict.kind == ACK]
        queue_acks(pipe, acks)
        start = time.perf_counter()
        try:
            replies = pipe.execute()
        except Exception as exc:  # Redis failed: nothing is acknowledged; every lease ends by the rule
            log.warning("writing %d messages' records failed, giving them back: %s", len(items), exc)
            for i, verdict in enumerate(verdicts):
                if verdict.kind == ACK:
                    verdicts[i] = Verdict(REQUEUE)
                    self.failed(items[i].message_id, items[i].message.job_id, exc)
            return
        metrics.STAGE_SECONDS.labels(stage="write").observe(time.perf_counter() - start)
        written = 0
        for read, reply in zip(reads, replies, strict=False):
            records = read(reply) or []
            self._count(records)
            written += len(records)
        if work:
            log.info("recorded %d images of %d messages", written, len(work))
        for i in acks:
            verdicts[i] = Verdict(ACKED)
        now = time.time()
        metrics.observe_many(
            metrics.END_TO_END,
            [max(0.0, now - w.item.sent) for w in work if w.error is None and w.item.sent for _ in w.records],
        )
        for w in work:
            if w.error is not None:
                log.warning(
                    "message %s failed, giving it back: %s: %s", w.item.message_id, w.error.__class__.__name__, w.error
                )
                self.failed(w.item.message_id, w.item.message.job_id, w.error)

    def _dropped(self, message_id: str, message: Message, begun: Begun) -> bool:
        """Messages acknowledged without work: no job, a duplicate copy, or pinned to another model."""
        if begun.state == "no_job":
            log.warning(
                "message %s: job %r does not exist (expired or never created); dropped", message_id, message.job_id
            )
            return True
        if begun.state == "duplicate":
            metrics.DUPLICATES.inc()
            log.info("message %s: another copy is leased by a live worker; this copy dropped", message_id)
            return True
        return self._redirected(message_id, message, begun.pin)

    def _redirected(self, message_id: str, message: Message, pin: str) -> bool:
        """A message of a job pinned to a model this worker does not serve (taken from the default queue, or
        prefetched from the old model's queue before a reload) is sent to its model's queue, not processed:
        its lease given back first (else the copy sent would look like a duplicate), then acknowledged here;
        nothing lost (the records' write-once HSETNX covers any race)."""
        mine = self.engine.model_id
        if self.redirect is None or not pin or pin.rsplit("@", 1)[-1] == mine.rsplit("@", 1)[-1]:
            return False
        self.leases.give_back(message_id, message.job_id)
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
            records = self._classify([path])
            self._count(self.store.write(job_id, records, self.engine.model_id) or [])
        return []

    def failed(self, message_id: str, job_id: str, exc: BaseException) -> None:
        """End the lease of a delivery that failed: charged if it ran alone, else a suspect; slowness is free."""
        failure = "" if isinstance(exc, TooSlow) else f"{exc.__class__.__name__}: {exc}"
        try:
            self.leases.give_back(message_id, job_id, failure or "")
        except Exception as store_exc:  # Redis may be what failed: the lease then expires by itself
            log.warning("cannot give back message %s: %s", message_id, store_exc)

    def _classify(self, paths: Sequence[str]) -> list[Record]:
        started = time.monotonic()
        now = [started] * len(paths)
        records = self.batcher.run([native_path(p) for p in paths], now, started + self.limits.time_limit)
        if len(records) < len(paths):
            raise _too_slow(len(paths), records, started)
        return records

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
        """Count records written: one increment per status and error reason, not one per record."""
        statuses = collections.Counter(record["status"] for record in written)
        for status, count in statuses.items():
            metrics.IMAGES.labels(status=status).inc(count)
        if len(written) > statuses.get("ok", 0):
            reasons = collections.Counter(r.get("reason", "internal") for r in written if r["status"] != "ok")
            for reason, count in reasons.items():
                metrics.ERRORS.labels(reason=reason).inc(count)


def _too_slow(count: int, done: list[Record], started: float) -> TooSlow:
    return TooSlow(
        f"{count - len(done)} of {count} images not classified within {time.monotonic() - started:.0f} s of "
        f"starting (the time limit, a fraction of IMGPIPE_VISIBILITY_TIMEOUT); {len(done)} recorded",
        done,
    )


def _error(path: str, error: str, model: str, reason: str) -> Record:
    """An error record for a path already in its text form (kept as it came, whatever it holds)."""
    record = error_record("", error, model, reason)
    record["path"] = path
    return record
