"""Bigger models meet GPU memory: run a batch, and on CUDA out-of-memory split it in halves and retry, down to
single images, so that a batch that does not fit still gets every prediction (and nothing is charged to the
images until a real failure). A pure function of the batch and the step; the engine or worker wires it in."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def is_oom(exc: BaseException) -> bool:
    """CUDA out-of-memory, as torch raises it (``torch.cuda.OutOfMemoryError``, or a RuntimeError from older
    builds and some kernels whose message says so)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_split_on_oom(
    step: Callable[[Sequence[T]], list[R]],
    items: Sequence[T],
    on_split: Callable[[int], None] | None = None,
    release: Callable[[], None] | None = None,
) -> list[R]:
    """``step(items)``, one result per item; on out-of-memory the batch is halved and each half retried
    (recursively), results kept in input order. A single item that still does not fit re-raises the error.

    ``on_split(n)`` is told the size of each batch that was split (for a log line or a metric); ``release``
    frees cached memory before the retry (default: ``torch.cuda.empty_cache`` when CUDA is up).
    """
    try:
        results = step(items)
    except Exception as exc:
        if not is_oom(exc) or len(items) <= 1:
            raise
        del exc  # drop the traceback's references to the failed batch's tensors before retrying
        if release is not None:
            release()
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        if on_split is not None:
            on_split(len(items))
        middle = len(items) // 2
        return run_split_on_oom(step, items[:middle], on_split, release) + run_split_on_oom(
            step, items[middle:], on_split, release
        )
    if len(results) != len(items):
        raise ValueError(f"step returned {len(results)} results for {len(items)} items")
    return results


def largest_batch(step: Callable[[int], object], start: int = 1, limit: int = 4096) -> int:
    """The largest batch size ``step(n)`` runs without out-of-memory, by doubling then bisecting (0 if not even
    ``start`` fits). Used on a GPU host to measure what each architecture fits; other errors propagate."""

    def fits(n: int) -> bool:
        try:
            step(n)
            return True
        except Exception as exc:
            if not is_oom(exc):
                raise
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            return False

    if not fits(start):
        return 0
    low, high = start, start
    while high < limit and fits(min(high * 2, limit)):
        low = high = min(high * 2, limit)
    if high >= limit:
        return limit
    high = min(high * 2, limit)  # known not to fit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
