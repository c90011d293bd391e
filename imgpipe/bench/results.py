"""The benchmark harness's shared result types: a leaf module the suites and the `imgpipe bench` command both import."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imgpipe.errors import ImgpipeError


class BenchError(ImgpipeError):
    """A measurement went wrong (a worker did not start, a job did not finish, counts did not add up)."""


@dataclass(frozen=True)
class Variant:
    """One measured way of doing the work; ``baseline`` names the variant it is compared with (None: none)."""

    name: str
    rate: float
    baseline: str | None
    what: str = ""


@dataclass
class SuiteResult:
    """A suite's measurements: a header line, the variants, and figures about the run for the JSON summary."""

    suite: str
    unit: str  # "images/s", "paths/s"
    header: str
    variants: list[Variant] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, rate: float, baseline: str | None, what: str = "") -> None:
        self.variants.append(Variant(name, rate, baseline, what))

    def rates(self) -> dict[str, float]:
        return {v.name: round(v.rate, 1) for v in self.variants}

    def ratios(self) -> dict[str, float]:
        """Each compared variant's rate over its baseline's (a baseline's own ratio is 1.0)."""
        rates = {v.name: v.rate for v in self.variants}
        return {v.name: round(v.rate / rates[v.baseline], 2) for v in self.variants if v.baseline is not None}

    def table(self) -> str:
        ratios = self.ratios()
        width = max([len(v.name) for v in self.variants] + [24])
        lines = [self.header, f"  {'variant':<{width}} {self.unit:>10} {'vs baseline':>12}  what"]
        for v in self.variants:
            ratio = f"{ratios[v.name]:.2f}x" if v.name in ratios else "-"
            lines.append(f"  {v.name:<{width}} {v.rate:10.0f} {ratio:>12}  {v.what}")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {"unit": self.unit, **self.info, "rates": self.rates(), "ratios": self.ratios()}


def median_rate(fn: Callable[[], int], repeat: int) -> float:
    """Median items/s of ``fn`` (which returns how many items it handled) over ``repeat`` runs."""
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        count = fn()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


@dataclass
class Rounds:
    """Rates of each variant over interleaved rounds (A B C, A B C, ...), so that drift in the machine's load
    touches every variant alike; the median of each counts."""

    rates: dict[str, list[float]] = field(default_factory=dict)

    def add(self, variant: str, rate: float) -> None:
        self.rates.setdefault(variant, []).append(rate)

    def median(self, variant: str) -> float | None:
        values = self.rates.get(variant)
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class HistogramCounts:
    """A Prometheus histogram's cumulative bucket counts (upper bound -> count, +Inf included), sum and count,
    as read from /metrics; differences of two readings are what happened in between."""

    buckets: dict[float, float]
    sum: float = 0.0
    count: float = 0.0

    def __add__(self, other: HistogramCounts) -> HistogramCounts:
        bounds = set(self.buckets) | set(other.buckets)
        merged = {b: self.buckets.get(b, 0.0) + other.buckets.get(b, 0.0) for b in bounds}
        return HistogramCounts(merged, self.sum + other.sum, self.count + other.count)

    def __sub__(self, before: HistogramCounts) -> HistogramCounts:
        delta = {b: c - before.buckets.get(b, 0.0) for b, c in self.buckets.items()}
        return HistogramCounts(delta, self.sum - before.sum, self.count - before.count)

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """The q-quantile estimated as Prometheus' histogram_quantile does: linear within the bucket that holds
        it (from 0 for the first), the highest finite bound when it falls in +Inf; None without observations."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile {q} is outside [0, 1]")
        bounds = sorted(self.buckets)
        total = self.buckets.get(math.inf, 0.0)
        if not bounds or total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for bound in bounds:
            count = self.buckets[bound]
            if count >= rank and count > below:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - below) / (count - below)
            lower, below = bound, count
        return lower
