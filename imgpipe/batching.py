"""Adaptive batch sizing for a latency target (IMGPIPE_MAX_LATENCY_MS), as Triton's and BentoML's schedulers do.

A pure, clock-free class: the batcher tells it how long each batch took and how long each image waited from
receipt to record, and the group consumer asks it how many images the next group (a batch) waits for and how
long it may wait to fill.

Model: with decoding overlapped, an image that arrives waits for at most the batch in flight, then its own
batch's fill wait and inference, so latency ~ fill wait + 2 x batch size x per-image inference time. The size is
the largest that fits the target by that model, corrected by feedback: when the measured p95 exceeds the target
the correction shrinks (multiplicatively), when it is well below it grows back slowly (AIMD-like, so one slow
batch does not collapse the size, and a steady overshoot does not persist).

The plan bounds the *wait*: how many images a batch waits for and for how long. Messages already leased always
go into the group, up to the worker's maximum batch (worker/consumer.py), so a backlog is never throttled by a
small plan; a plan smaller than the backlog would only lower throughput and raise the latency it aims at.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# Latencies kept for the p95.
WINDOW = 256
# Weight of the newest batch in the moving average of the per-image inference time.
EWMA_ALPHA = 0.2
# Feedback: factor on an overshoot of the p95, factor while the p95 is below LOW_WATER x target.
SHRINK, GROW, LOW_WATER = 0.8, 1.05, 0.7
CORRECTION_RANGE = (1 / 16, 4.0)


@dataclass(frozen=True)
class Plan:
    """What the next batch may be: at most ``size`` images, waiting at most ``wait_s`` after its first."""

    size: int
    wait_s: float


class BatchSizer:
    """Sizes batches so that the p95 latency from receipt to record stays under ``target_s``."""

    def __init__(
        self, max_batch: int, max_wait_s: float, target_s: float, fit: Callable[[int], int] | None = None
    ) -> None:
        """``fit(n)``: the largest batch size of at most ``n`` that costs less than a larger one (an engine that
        pads batches to a few sizes on a GPU runs 40 images as 64: ``Engine.fitting_batch``); None: any size."""
        if max_batch < 1 or target_s <= 0 or max_wait_s < 0:
            raise ValueError("max_batch >= 1, target_s > 0 and max_wait_s >= 0 are required")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.target_s = target_s
        self.fit = fit
        self.per_image_s: float | None = None  # moving average of inference seconds per image
        self.correction = 1.0
        self._latencies: deque[float] = deque(maxlen=WINDOW)
        self._since_adjust = 0

    def plan(self) -> Plan:
        """The next batch's size limit and fill wait."""
        if self.per_image_s is None:  # nothing measured yet: the configured batch, short wait
            return Plan(self.max_batch, min(self.max_wait_s, self.target_s / 4))
        fits = self.target_s / (2 * self.per_image_s)
        size = max(1, min(self.max_batch, math.floor(fits * self.correction)))
        if self.fit is not None:
            size = max(1, min(size, self.fit(size)))
        slack = self.target_s - 2 * size * self.per_image_s
        return Plan(size, max(0.0, min(self.max_wait_s, slack)))

    def observe_batch(self, images: int, seconds: float) -> None:
        """One batch of ``images`` ran through inference in ``seconds``."""
        if images < 1 or seconds < 0:
            return
        sample = seconds / images
        self.per_image_s = sample if self.per_image_s is None else (
            EWMA_ALPHA * sample + (1 - EWMA_ALPHA) * self.per_image_s
        )  # fmt: skip

    def observe_latency(self, seconds: float) -> None:
        """One image's time from receipt (its message taken) to its record; adjusts the correction every
        quarter window."""
        self._latencies.append(seconds)
        self._since_adjust += 1
        if self._since_adjust < WINDOW // 4:
            return
        self._since_adjust = 0
        p95 = self.p95()
        if p95 is None:
            return
        low, high = CORRECTION_RANGE
        if p95 > self.target_s:
            self.correction = max(low, self.correction * SHRINK)
        elif p95 < LOW_WATER * self.target_s:
            self.correction = min(high, self.correction * GROW)

    def p95(self) -> float | None:
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
