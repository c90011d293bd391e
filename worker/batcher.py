"""Cross-message batching: images from any number of messages fill one inference batch.

Task threads submit paths; decode threads read, decode and preprocess them (Pillow releases the GIL); one
batch thread takes up to ``max_batch`` decoded images, waiting at most ``max_wait_ms`` after the first, and
runs them through the engine as one batch while the decode threads prepare the next. Each path's record
comes back on its own future, so each message waits only for its own images.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from imgpipe.batching import BatchSizer, Plan
from imgpipe.errors import ImageError
from imgpipe.model.engine import Engine
from imgpipe.model.preprocess import Preset
from imgpipe.records import Record
from imgpipe.settings import BatchSettings
from imgpipe.threads import at_least, take_more
from imgpipe.worker import metrics

log = logging.getLogger(__name__)


@dataclass
class _Item:
    path: str
    source: str  # message id, for the batch log line
    future: Future[Record] = field(default_factory=Future)
    tensor: torch.Tensor | None = None  # (C, H, W), once decoded
    preset: Preset | None = None  # the preset it was decoded with (a reload may change the model's)
    received: float = field(default_factory=time.monotonic)  # throughput hook: latency for imgpipe/batching.py


class Batcher:
    """Decode threads plus one batch thread around one engine (the only thread that calls ``predict``).

    ``engine`` may be replaced at any time (a model reload): the batch thread reads it once per batch, so the
    switch happens between batches and every record names the model that produced it."""

    def __init__(self, engine: Engine, settings: BatchSettings) -> None:
        self.engine = engine
        self.max_batch = settings.max_batch
        self.max_wait = settings.max_wait_ms / 1000.0
        # throughput hook: IMGPIPE_MAX_LATENCY_MS sizes each batch (imgpipe/batching.py); None: fixed sizes.
        self.sizer = (
            BatchSizer(settings.max_batch, self.max_wait, settings.max_latency_ms / 1000.0)
            if settings.max_latency_ms
            else None
        )
        self._todo: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        # Decoded images waiting for the batch thread: two batches' worth bounds memory and keeps one ahead.
        self._ready: queue.Queue[_Item | None] = queue.Queue(maxsize=2 * settings.max_batch)
        self._decoders = [
            threading.Thread(target=self._decode_loop, name=f"imgpipe-decode-{i}", daemon=True)
            for i in range(settings.decode_threads)
        ]
        self._runner = threading.Thread(target=self._batch_loop, name="imgpipe-batch", daemon=True)
        self._started = False
        self._lock = threading.Lock()
        self._busy = 0  # images submitted and not yet resolved
        self.last_progress = 0.0  # epoch seconds of the latest resolved image (0: none yet)

    def start(self) -> Batcher:
        for thread in [*self._decoders, self._runner]:
            thread.start()
        self._started = True
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Finish what was submitted, then stop the threads."""
        if not self._started:
            return
        for _ in self._decoders:
            self._todo.put(None)
        for thread in self._decoders:
            thread.join(timeout)
        self._ready.put(None)
        self._runner.join(timeout)
        self._started = False

    def submit(self, paths: Sequence[str], source: str = "", received: float | None = None) -> list[Future[Record]]:
        """Queue ``paths``; each future resolves to that path's record (or to the exception of its batch).

        ``received``: time.monotonic() of the message's receipt (default now), the start of its latency."""
        at = time.monotonic() if received is None else received
        items = [_Item(path, source, received=at) for path in paths]
        with self._lock:
            self._busy += len(items)
        for item in items:
            item.future.add_done_callback(self._resolved)
            self._todo.put(item)
        return [item.future for item in items]

    def _resolved(self, _future: Future[Record]) -> None:
        with self._lock:
            self._busy -= 1
        self.last_progress = time.time()

    def health(self) -> dict[str, float | int]:
        """For the worker's heartbeat: images in hand and the time of the latest one resolved."""
        return {"busy": self._busy, "progress": self.last_progress}

    def _decode_loop(self) -> None:
        while (item := self._todo.get()) is not None:
            if not item.future.set_running_or_notify_cancel():
                continue  # its message gave up waiting
            start = time.perf_counter()
            engine = self.engine
            result = engine.safe_load_image(item.path)
            metrics.STAGE_SECONDS.labels(stage="decode").observe(time.perf_counter() - start)
            if isinstance(result, ImageError):
                # An error record needs no inference: resolve it now and keep the batch for real images.
                item.future.set_result(engine.records_for([item.path], [result])[0])
                continue
            item.tensor = result
            item.preset = engine.preset
            self._ready.put(item)

    def _batch_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._ready.get()
            if first is None:
                return
            batch = [first]
            # Everything already decoded goes in, up to max_batch: a backlog is never held back by a smaller
            # plan (that would only make it grow). The plan says how long to wait for more, and for how many
            # (the latency target's lever, as in Triton's and BentoML's schedulers: the fill wait, not a cap).
            stopping = take_more(self._ready, batch, at_least(self.max_batch))
            plan = self.sizer.plan() if self.sizer else Plan(self.max_batch, self.max_wait)  # throughput hook
            if not stopping:
                deadline = time.monotonic() + plan.wait_s
                stopping = take_more(self._ready, batch, at_least(plan.size), deadline)
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        engine = self.engine  # one model per batch, even if a reload swaps it meanwhile
        paths = [item.path for item in batch]
        tensors: list[torch.Tensor | ImageError] = [
            item.tensor
            if item.preset == engine.preset and item.tensor is not None
            else engine.safe_load_image(item.path)
            for item in batch
        ]  # an image decoded for the previous model's preset is decoded again for this one
        start = time.perf_counter()
        try:
            records = engine.records_for(paths, tensors)
        except Exception as exc:  # e.g. CUDA out of memory: these messages are given back and retried
            log.exception("inference failed for a batch of %d images", len(batch))
            for item in batch:
                item.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        metrics.STAGE_SECONDS.labels(stage="infer").observe(elapsed)
        if self.sizer is not None:  # throughput hook: feed the adaptive sizer
            self.sizer.observe_batch(len(batch), elapsed)
            now = time.monotonic()
            for item in batch:
                self.sizer.observe_latency(now - item.received)
        metrics.BATCH_SIZE.observe(len(batch))
        done = time.monotonic()
        for item in batch:
            metrics.IMAGE_LATENCY.observe(done - item.received)
        metrics.observe_device(engine.device)
        log.debug("batch of %d images from %d messages", len(batch), len({item.source for item in batch}))
        for item, record in zip(batch, records, strict=True):
            item.tensor = None
            item.future.set_result(record)
