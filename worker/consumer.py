"""The worker's own message handling inside Celery's consumer: deliveries are grouped, not run one per thread.

Celery's default strategy turns each message into a request run on a pool thread that makes its own Redis round
trips and acknowledges itself, so a one-path message cost as much as a chunk (issue 9: 3-4 ms of round trips and a
thread hand-off per message). Here the task's Strategy only hands each kombu message to ``Runner.put`` (on the
consumer's event loop: validated there, no Redis), which counts the images held; the transport fetches while they
are under a bound (``Runner.room``), so that a chunked job spreads over every worker. A lease thread takes the
leases of every delivery waiting, in one Lua call, as they arrive (``Pipeline.lease_group``); group threads take
leased messages, up to a batch of images, and run them through ``Pipeline.work_group``: one Lua call marks them
working, their images share batches, and one pipeline writes every record, ends the leases and acknowledges the
messages. The promise is unchanged (docs/reliability.md): a message is acknowledged only after its records are
written.

Acknowledging happens on our own Redis client: the kombu message's delivery tag is removed from kombu's unacked hash
and index in the group's last pipeline, then the channel's local bookkeeping is told on its event loop (which frees
the prefetch slot and wakes the loop). A message given back is rejected with requeue through kombu.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kombu.transport import virtual

from imgpipe.messages import SENT_HEADER, VERSION_HEADER, Limits, Refused, parse
from imgpipe.threads import at_least, take_more
from imgpipe.untrusted import loads
from imgpipe.worker import metrics
from imgpipe.worker.pipeline import ACK, ACKED, ALONE, REQUEUE, WORK, GiveBack, Item, Pipeline, Verdict, Work

log = logging.getLogger(__name__)

# Message ids become parts of Redis keys: printable ASCII, no spaces, bounded (Celery and imgpipe send uuids).
MESSAGE_ID = re.compile(r"[\x21-\x7e]{1,200}")
# Most deliveries leased in one Lua call.
LEASE_MAX = 256
# Weight of each new delivery in the recent paths per message (an exponential mean).
MEAN_WEIGHT = 0.2
# Threads for messages that must run alone (suspects; few at a time by nature).
ALONE_THREADS = 2


@dataclass
class _Delivery:
    raw: Any  # the kombu message
    received: float
    item: Item | None = None
    weight: int = 1  # images it holds: its paths (1 for a refused message)
    stage: str = "new"  # "passed" to a group or alone thread, "settled" (acknowledged or given back)


def parse_delivery(raw: Any, limits: Limits, received: float) -> Item:
    """The validated message of a kombu delivery (Celery task protocol 2) received at ``received``
    (time.monotonic()); raises Refused."""
    headers = raw.headers if isinstance(raw.headers, dict) else {}
    message_id = headers.get("id")
    if not isinstance(message_id, str) or not MESSAGE_ID.fullmatch(message_id):
        raise Refused("message_id", f"message id {str(message_id)[:80]!r} is not valid")
    try:  # JSON only (the transport refused every other content type); kombu's decoder adds an object hook
        body = loads(raw.body)
    except (ValueError, TypeError) as exc:
        raise Refused("junk", f"body does not decode: {exc.__class__.__name__}: {str(exc)[:200]}") from None
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        raise Refused("schema", "expected a Celery protocol 2 body [args, kwargs, embed]")
    args, kwargs, _embed = body
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise Refused("schema", "expected a Celery protocol 2 body [args, kwargs, embed]")
    return Item(message_id, parse(args, kwargs, headers.get(VERSION_HEADER), limits), received, sent_time(headers))


def sent_time(headers: dict[str, Any]) -> float | None:
    """The producer's send time (imgpipe_sent, epoch seconds), or None where a message has none or one that is
    not a plausible time (it only dates a latency metric; the message is served either way)."""
    sent = headers.get(SENT_HEADER)
    if isinstance(sent, bool) or not isinstance(sent, (int, float)):
        return None
    seconds = float(sent)
    return seconds if 0 < seconds < 1e11 else None  # NaN and inf fail here


def queue_acks(pipe: Any, raws: Sequence[Any]) -> None:
    """Remove these deliveries from kombu's unacknowledged hash and index, on ``pipe``."""
    by_keys: dict[tuple[str, str], list[Any]] = {}
    for raw in raws:
        qos = raw.channel.qos
        by_keys.setdefault((qos.unacked_key, qos.unacked_index_key), []).append(raw.delivery_tag)
    for (unacked, index), tags in by_keys.items():
        pipe.zrem(index, *tags)
        pipe.hdel(unacked, *tags)


def acked(raw: Any) -> None:
    """Tell the channel a delivery is acknowledged (its Redis entries are gone): frees its prefetch slot."""
    with contextlib.suppress(Exception):  # a channel closed meanwhile (Redis reconnect): nothing left to free
        virtual.QoS.ack(raw.channel.qos, raw.delivery_tag)
    raw._state = "ACK"


def _acked_all(raws: Sequence[Any]) -> None:
    for raw in raws:
        acked(raw)


def requeue(raw: Any) -> None:
    """Give a delivery back to the front of its queue (kombu's reject with requeue)."""
    try:
        raw.reject(requeue=True)
    except Exception as exc:  # Redis is down: its lease or kombu's visibility timeout brings it back
        log.warning("cannot give back a message (%s); it comes back when its lease expires", exc)
        acked(raw)


def ack(raw: Any) -> None:
    try:
        raw.ack()
    except Exception as exc:
        log.warning("cannot acknowledge a message (%s); a copy may be delivered again and dropped", exc)
        acked(raw)


class Runner:
    """Between Celery's consumer and the pipeline (one per worker process): a lease thread takes the leases of
    deliveries as they arrive, and group threads run the leased messages in groups: each group's images
    decoded and predicted on its own thread (worker/batcher.py)."""

    def __init__(self, pipeline: Pipeline, limits: Limits, group_images: int, threads: int, hold_images: int) -> None:
        """``threads`` group threads: the lanes (worker/batcher.py) plus one, so that one group forms (or writes
        its records) while the others decode and predict. ``hold_images``: the images this process holds at once
        (delivered, not yet settled), for the transport's prefetch (``room``)."""
        self.pipeline = pipeline
        self.limits = limits
        self.lanes = max(1, threads - 1)  # the group threads that decode and predict at once (one forms the next)
        self.group_images = max(1, group_images)
        self.hold_images = max(1, hold_images)
        self._held = 0  # images of the deliveries put and not yet settled
        self._mean_paths = 0.0  # paths per message of recent deliveries (the estimate for those not yet read)
        self._backlog = 0  # messages left in the queue at the transport's last take (``saw_backlog``)
        self._inbox: queue.SimpleQueue[_Delivery | None] = queue.SimpleQueue()
        # Leased work for the group threads; they never wait on it with a timeout (``_fill``, docs/reliability.md).
        self._leased: queue.Queue[tuple[_Delivery, Work] | None] = queue.Queue()
        # Notified when leased work arrives or a lane frees: a group waiting to fill looks again (``_fill``).
        self._changed = threading.Condition()
        pipeline.gate.on_release = self._poke
        self._lease_thread = threading.Thread(target=self._lease_loop, name="imgpipe-lease", daemon=True)
        self._threads = [
            threading.Thread(target=self._work_loop, name=f"imgpipe-group-{i}", daemon=True) for i in range(threads)
        ]
        self._alone = ThreadPoolExecutor(ALONE_THREADS, thread_name_prefix="imgpipe-alone")
        self._lock = threading.Lock()
        self._pending = 0  # deliveries put and not yet settled
        self._settled = threading.Condition(self._lock)
        # The consumer's event loop (kombu's Hub; set by the Strategy on each consumer start): freed prefetch
        # slots are reported on it, which also wakes it to fetch more.
        self.hub: Any = None

    def start(self) -> Runner:
        for thread in [self._lease_thread, *self._threads]:
            thread.start()
        return self

    def put(self, raw: Any) -> None:
        """Called by Celery's consumer for each delivery, on its event loop: the message is validated here (no
        Redis), so that the images it holds count before the transport asks for more (``room``)."""
        delivery = _Delivery(raw, time.monotonic())
        self._parse(delivery)
        with self._lock:
            self._pending += 1
            self._held += delivery.weight
        self._inbox.put(delivery)

    def saw_backlog(self, left: int) -> None:
        """The transport's last take left ``left`` messages in the queue (worker/transport.py)."""
        self._backlog = left

    def hold(self) -> int:
        """Images this process may hold now: ``hold_images``; under a latency target (IMGPIPE_MAX_LATENCY_MS) a
        planned batch per lane and one filling, unless more than that waits in the queue.

        What a worker holds waits in it, and its latency counts from receipt: with a full hold at a steady rate
        short of capacity, each group took every message held, batches grew to the maximum, and the held
        images waited behind them (one-path digits at 0.6 of capacity: p95 240 ms for a 50 ms target, whatever
        the plan said). Held to the plan, the rest waits in the queue for whichever process frees first. A
        backlog (more images in the queue than the plan holds, its messages counted at the recent paths per
        message) is served at full batches: a plan smaller than a backlog only lowers throughput, and the
        queue's wait then dwarfs any batch's."""
        sizer = self.pipeline.batcher.sizer
        if sizer is None:
            return self.hold_images
        planned = (self.lanes + 1) * sizer.plan().size
        waiting = self._backlog * max(1.0, self._mean_paths)  # images, at the recent paths per message
        return self.hold_images if waiting > planned else min(self.hold_images, planned)

    def room(self) -> int:
        """Messages the transport may take now (worker/transport.py): while this process holds fewer images than
        ``hold`` (at most ``hold_images``), as many as the rest would fill at the recent paths per message (at
        least one). A worker takes a share of a chunked job, not all of it: the other workers, processes and
        hosts get the rest."""
        hold = self.hold()
        with self._lock:
            left = hold - self._held
            if left <= 0:
                return 0
            if not self._mean_paths:  # nothing seen yet: one message, whose size then sets the estimate
                return 1
            return max(1, int(left / self._mean_paths))

    def images_left(self) -> tuple[int, float]:
        """(Images this process may still take, paths to assume for a message that does not say how many it
        carries), for the transport's take (worker/transport.py TAKE_LUA): it counts each message by its
        ``imgpipe_paths`` header, so a worker that has just served one-path messages takes a share of a chunked
        job, not the whole of it at its one-path estimate (measured: with 2 processes, 300 photos in 10 chunks
        ran at 0.66 of the in-process rate after a one-path job, 1.01 without one)."""
        hold = self.hold()
        with self._lock:
            return max(0, hold - self._held), max(1.0, self._mean_paths)

    def drain(self, timeout: float) -> bool:
        """Wait until every delivery is settled (``pipeline.stopping`` set: those not started go back)."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("stopping with %d messages unsettled; their leases bring them back", self._pending)
                    return False
                self._settled.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        self._inbox.put(None)  # the lease thread passes it on to the group threads
        self._alone.shutdown(wait=False, cancel_futures=True)

    def _done(self, deliveries: Sequence[_Delivery]) -> None:
        """Count deliveries settled (each once): the drain waits for them, the transport's room grows."""
        with self._settled:
            for d in deliveries:
                if d.stage != "settled":
                    d.stage = "settled"
                    self._pending -= 1
                    self._held -= d.weight
            self._settled.notify_all()

    def _give_back(self, deliveries: Sequence[_Delivery]) -> None:
        """After an unexpected error: requeue deliveries not settled (their leases end by the rule)."""
        for d in deliveries:
            if d.stage != "settled":
                requeue(d.raw)
        self._done(deliveries)
        self._on_loop(_acked_all, [])

    def _lease_loop(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                self._offer(*[None for _ in self._threads])
                return
            group = [first]
            if take_more(self._inbox, group, at_least(LEASE_MAX)):
                self._inbox.put(None)  # for the next turn
            try:
                self._lease(group)
            except Exception:  # never lose the thread, nor the room the deliveries held: given back
                log.exception("taking the leases of %d messages failed", len(group))
                self._give_back([d for d in group if d.stage == "new"])

    def _lease(self, group: list[_Delivery]) -> None:
        refused = [d for d in group if d.item is None]
        valid = [d for d in group if d.item is not None]
        raws = [d.raw for d in valid]
        try:
            verdicts = self.pipeline.lease_group(
                [d.item for d in valid if d.item is not None],
                lambda pipe, indices: queue_acks(pipe, [raws[i] for i in indices]),
            )
        except Exception as exc:  # Redis failed before anything was leased
            log.warning("taking %d messages failed, giving them back: %s", len(valid), exc)
            verdicts = [Verdict(REQUEUE) for _ in valid]
        for d in refused:
            ack(d.raw)
        self._settle(list(zip(valid, verdicts, strict=True)), refused)

    def _settle(self, outcomes: list[tuple[_Delivery, Verdict]], refused: Sequence[_Delivery] = ()) -> None:
        done: list[Any] = []
        settled = list(refused)
        leased: list[tuple[_Delivery, Work]] = []
        for d, verdict in outcomes:
            if verdict.kind == ALONE:
                d.stage = "passed"
                self._alone.submit(self._run_alone, d, verdict)
                continue
            if verdict.kind == WORK:
                assert verdict.work is not None
                d.stage = "passed"
                leased.append((d, verdict.work))
                continue
            settled.append(d)
            if verdict.kind == ACKED:
                done.append(d.raw)
            elif verdict.kind == ACK:
                ack(d.raw)
            else:
                requeue(d.raw)
        if leased:
            self._offer(*leased)
        if settled:
            self._done(settled)  # before the loop is woken: its next fetch sees the room
        if done or settled:
            self._on_loop(_acked_all, done)

    def _work_loop(self) -> None:
        while True:
            first = self._leased.get()
            if first is None:
                return
            group = [first]
            # What is leased already goes in, up to a full batch: a backlog is never held back by a smaller plan.
            stop = take_more(self._leased, group, self._enough(self.group_images))
            if not stop:
                stop = self._fill(group)
            self._work(group)
            if stop:
                return

    def _fill(self, group: list[tuple[_Delivery, Work]]) -> bool:
        """While every lane is busy the group waits to fill, as the plan says (IMGPIPE_MAX_WAIT_MS, or the latency
        target's size and wait): its images would wait for a core anyway, and its round trips then serve more
        messages. It starts as soon as a lane frees, full or not: a wait that outlasted the busy lane left the
        core idle (one-path digits at a steady rate topped out at about half the rate of a backlog). Returns
        True when the stop sentinel was taken."""
        gate = self.pipeline.gate
        if not gate.full_for(self.lanes):
            return False
        plan = self.pipeline.batcher.plan()
        full = self._enough(plan.size)
        deadline = time.monotonic() + plan.wait_s
        while not full(group):
            with self._changed:  # checked under the lock that _offer and _poke notify with: no wake-up is lost
                left = deadline - time.monotonic()
                if left <= 0 or not gate.full_for(self.lanes):
                    return False
                if self._leased.empty():
                    self._changed.wait(left)
            if take_more(self._leased, group, full):
                return True
        return False

    def _offer(self, *items: tuple[_Delivery, Work] | None) -> None:
        """Hand leased work (or the stop sentinels) to the group threads."""
        for item in items:
            self._leased.put(item)
        self._poke()

    def _poke(self) -> None:
        with self._changed:
            self._changed.notify_all()

    @staticmethod
    def _enough(images: int) -> Callable[[list[tuple[_Delivery, Work]]], bool]:
        """``take_more``'s ``full`` for a number of images (a group's messages weigh their images), counting
        each new member once (a group of 64 one-path messages would otherwise be summed 64 times)."""
        counted = [0, 0]  # members counted, their images

        def full(group: list[tuple[_Delivery, Work]]) -> bool:
            for _, work in group[counted[0] :]:
                counted[1] += _images(work)
            counted[0] = len(group)
            return counted[1] >= images

        return full

    def _work(self, group: list[tuple[_Delivery, Work]]) -> None:
        raws = [d.raw for d, _ in group]
        try:
            verdicts = self.pipeline.work_group(
                [w for _, w in group], lambda pipe, indices: queue_acks(pipe, [raws[i] for i in indices])
            )
        except Exception:  # never lose the thread; the deliveries' leases bring them back
            log.exception("handling a group of %d messages failed", len(group))
            verdicts = [Verdict(REQUEUE) for _ in group]
        try:
            self._settle([(d, v) for (d, _), v in zip(group, verdicts, strict=True)])
        except Exception:  # never lose the thread, nor the room the deliveries held
            log.exception("settling a group of %d messages failed", len(group))
            self._give_back([d for d, _ in group])

    def _parse(self, delivery: _Delivery) -> None:
        try:
            delivery.item = parse_delivery(delivery.raw, self.limits, delivery.received)
        except Refused as exc:  # before any Redis write; dropped (acknowledged), never retried
            metrics.REFUSED.labels(reason=exc.reason).inc()
            log.error("a message was refused (%s): %s; dropped", exc.reason, exc.detail)
            return
        delivery.weight = paths = max(1, len(delivery.item.message.paths))
        with self._lock:  # the first message sets the mean, later ones move it
            mean = self._mean_paths
            self._mean_paths = paths if not mean else mean + (paths - mean) * MEAN_WEIGHT

    def _on_loop(self, callback: Any, *args: Any) -> None:
        """Run ``callback`` on the consumer's event loop and wake it (it may be waiting with every prefetch
        slot taken); directly when there is no loop."""
        hub = self.hub
        if hub is None:
            callback(*args)
        else:
            hub.call_soon(callback, *args)

    def _run_alone(self, delivery: _Delivery, verdict: Verdict) -> None:
        """A suspect or a message at its delivery limit: on its own, one image at a time (Pipeline.process)."""
        item = delivery.item
        assert item is not None
        try:
            self.pipeline.process(item.message_id, item.message, verdict.begun)
            ack(delivery.raw)
        except GiveBack:
            requeue(delivery.raw)
        except Exception as exc:  # given back; charged only if it ran alone (docs/reliability.md)
            log.warning("message %s failed, giving it back: %s: %s", item.message_id, exc.__class__.__name__, exc)
            self.pipeline.failed(item.message_id, item.message.job_id, exc)
            requeue(delivery.raw)
        finally:
            self._done([delivery])
            self._on_loop(_acked_all, [])


def _images(work: Work) -> int:
    return max(1, len(work.good))


def strategy(task: Any, app: Any, consumer: Any, **_: Any) -> Any:
    """Celery's per-task strategy hook (``Task.Strategy``): hand each delivery to the task's Runner."""
    runner: Runner = task.runner
    runner.hub = getattr(consumer, "hub", None)

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **__: Any) -> None:
        runner.put(message)

    return on_message
