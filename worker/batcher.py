"""Batches run where they are formed: the thread that took a group of messages reads, decodes and predicts their
images itself, batch after batch.

Each group thread of the consumer (worker/consumer.py) is a lane, as in ``Engine.classify``: while one lane's
batch is in the model (torch releases the GIL) the others decode theirs or write their records, so the cores stay
busy with no hand-off per image between threads. The earlier design (decode threads feeding one inference thread
through queues, a future per image) spent its time waking threads: on 2 cores the worker ran a third of
`imgpipe classify`'s rate with most of its CPU in context switches (perf). With IMGPIPE_DECODE_THREADS lanes
(one per core) each batch runs on cores / lanes torch threads (imgpipe/threads.py).

Images from many messages still share one batch: a group is as many leased messages as fill a batch. The fill
wait and the adaptive size (IMGPIPE_MAX_LATENCY_MS, imgpipe/batching.py) shape the groups.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from imgpipe.batching import BatchSizer, Plan
from imgpipe.errors import ImageError
from imgpipe.model.engine import Engine
from imgpipe.records import Record
from imgpipe.settings import BatchSettings
from imgpipe.worker import metrics

log = logging.getLogger(__name__)

# The stage histograms' series of the batcher, looked up once (a labels() call per image cost more than its
# observation).
DECODE_SECONDS = metrics.STAGE_SECONDS.labels(stage="decode")
INFER_SECONDS = metrics.STAGE_SECONDS.labels(stage="infer")


class Batcher:
    """Runs images through one engine on the calling thread, up to ``max_batch`` per inference batch; any
    number of threads may call ``run`` at once.

    ``engine`` may be replaced at any time (a model reload): it is read once per batch, so the switch happens
    between batches and every record names the model that produced it (its images decoded for that model)."""

    def __init__(self, engine: Engine, settings: BatchSettings) -> None:
        self.engine = engine
        self.max_batch = settings.max_batch
        self.max_wait = settings.max_wait_ms / 1000.0
        # throughput hook: IMGPIPE_MAX_LATENCY_MS sizes each batch (imgpipe/batching.py); None: fixed sizes.
        self.sizer = (
            BatchSizer(
                settings.max_batch,
                self.max_wait,
                settings.max_latency_ms / 1000.0,
                fit=lambda rows: self.engine.fitting_batch(rows),  # the engine of the moment (reloads)
            )
            if settings.max_latency_ms
            else None
        )
        self._lock = threading.Lock()
        self._busy = 0  # images in ``run`` and not yet resolved
        self.last_progress = 0.0  # epoch seconds of the latest image decoded or batch predicted (0: none yet)
        self._lanes: dict[int, float] = {}  # thread id of each lane in ``run`` -> epoch seconds of its last progress

    def plan(self) -> Plan:
        """How many images the next batch waits for, and how long (the group consumer's fill rule)."""
        return self.sizer.plan() if self.sizer else Plan(self.max_batch, self.max_wait)  # throughput hook

    def health(self) -> dict[str, float | int]:
        """For the worker's heartbeat: images in hand and the time of the latest progress of the slowest lane
        in work, so that one lane stuck on a file (a stalled network mount) shows as a stall for the liveness
        check (imgpipe/health.py) even while the other lanes go on."""
        with self._lock:
            lanes = list(self._lanes.values())
            return {"busy": self._busy, "progress": min(lanes) if lanes else self.last_progress}

    def run(self, paths: Sequence[str], received: Sequence[float], deadline: float | None = None) -> list[Record]:
        """Records for ``paths`` in order, in batches of up to ``max_batch``; ``received[i]`` is the
        time.monotonic() of path i's message receipt (where its latency starts).

        Past ``deadline`` (time.monotonic()) no further image starts: the records done are returned, fewer than
        the paths. An inference failure (after the engine's out-of-memory splitting) raises.
        """
        lane = threading.get_ident()
        with self._lock:
            self._busy += len(paths)
            self._lanes[lane] = time.time()
        try:
            records: list[Record] = []
            for start in range(0, len(paths), self.max_batch):
                end = start + self.max_batch
                batch = self._run_batch(paths[start:end], received[start:end], deadline)
                records.extend(batch)
                if start + len(batch) < min(len(paths), end):
                    break  # the deadline passed
            return records
        finally:
            with self._lock:
                self._busy -= len(paths)
                self._lanes.pop(lane, None)

    def _progress(self) -> None:
        now = time.time()
        self.last_progress = now
        self._lanes[threading.get_ident()] = now  # an existing key: no resize, safe beside ``health``'s copy

    def _run_batch(self, paths: Sequence[str], received: Sequence[float], deadline: float | None) -> list[Record]:
        engine = self.engine  # one model per batch, even if a reload swaps it meanwhile
        tensors = []
        decoded: list[float] = []  # seconds per image, observed together after the batch (metrics.observe_many)
        with engine.reader() as reader:  # each folder walked once per batch (imgpipe/safety.py)
            for path in paths:
                if deadline is not None and time.monotonic() > deadline:
                    break
                start = time.perf_counter()
                tensors.append(engine.safe_load_image(path, reader))
                decoded.append(time.perf_counter() - start)
                self._progress()
        metrics.observe_many(DECODE_SECONDS, decoded)
        start = time.perf_counter()
        records = engine.records_for(paths[: len(tensors)], tensors)  # error records need no inference
        elapsed = time.perf_counter() - start
        self._progress()
        size = sum(1 for t in tensors if not isinstance(t, ImageError))
        if size:
            INFER_SECONDS.observe(elapsed)
            metrics.BATCH_SIZE.observe(size)
            metrics.observe_device(engine.device)
        done = time.monotonic()
        latencies = [done - at for at in received[: len(tensors)]]
        metrics.observe_many(metrics.IMAGE_LATENCY, latencies)
        if self.sizer is not None and size:  # throughput hook: feed the adaptive sizer
            self.sizer.observe_batch(size, elapsed)
            for latency in latencies:
                self.sizer.observe_latency(latency)
        return records
