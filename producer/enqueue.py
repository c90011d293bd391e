"""Send paths to the workers: chunks of paths per message, by task name, with pipelined Redis writes.

No torch and no worker import here: a producer host needs only Celery and redis-py.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator

import redis
from celery import Celery

from imgpipe import defaults
from imgpipe.broker import Envelopes, make_celery
from imgpipe.errors import ConfigError
from imgpipe.jobs import add_pending, add_to_total
from imgpipe.paths import path_text
from imgpipe.settings import RedisSettings

# Messages published per Redis round trip (each group first raises the job's total, then is published).
GROUP_MESSAGES = 128


def producer_app(settings: RedisSettings) -> Celery:
    """The producer's Celery app: broker and serializer settings only, no tasks registered."""
    return make_celery("imgpipe-producer", settings)


def chunked(paths: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of at most ``size`` paths, taken lazily from ``paths``."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    source = iter(paths)
    while chunk := list(itertools.islice(source, size)):
        yield chunk


class Enqueuer:
    """Publishes one job's paths as ``imgpipe.classify_chunk`` messages of ``chunk_size`` paths each.

    The job's total is raised before the messages that carry those images are published, so a worker can
    never record more images than the total says. Use as a context manager.
    """

    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        job_id: str,
        *,
        chunk_size: int,
        ttl_seconds: int,
        group_messages: int = GROUP_MESSAGES,
        queue: str | None = None,
    ) -> None:
        if chunk_size > defaults.MAX_MESSAGE_PATHS:
            raise ConfigError(
                f"chunk size {chunk_size} is above the {defaults.MAX_MESSAGE_PATHS} paths a worker accepts"
            )
        self.client = client
        self.app = app
        self.job_id = job_id
        self.chunk_size = chunk_size
        self.ttl_seconds = ttl_seconds
        self.group_messages = group_messages
        self.queue = queue  # a pinned job's model queue (imgpipe.jobs.job_queue); None: the default queue
        self.images = 0
        self.messages = 0
        self._envelopes: Envelopes | None = None

    def __enter__(self) -> Enqueuer:
        self._envelopes = Envelopes()
        return self

    def __exit__(self, *exc: object) -> None:
        self._envelopes = None

    def add(self, paths: Iterable[str]) -> int:
        """Enqueue ``paths`` (consumed lazily, in groups); returns how many were sent."""
        sent = 0
        texts = (path_text(path) for path in paths)  # the lossless text form (docs/reliability.md)
        for group in _grouped(chunked(texts, self.chunk_size), self.group_messages):
            sent += self._send_group(group)
        return sent

    def _send_group(self, chunks: list[list[str]]) -> int:
        """One round trip: raise the job's total and its pending messages, then push the messages (in this order
        on one connection, so no worker can see a message before the total that counts it)."""
        if self._envelopes is None:
            raise RuntimeError("use Enqueuer as a context manager")
        count = sum(len(chunk) for chunk in chunks)
        ids = [os.urandom(16).hex() for _ in chunks]  # 128 random bits, as uuid4().hex has 122, at a fifth of the cost
        queue = self.queue or self.app.conf.task_default_queue
        pipe = self.client.pipeline(transaction=False)
        add_to_total(pipe, self.job_id, count, self.ttl_seconds)
        add_pending(pipe, self.job_id, dict(zip(ids, chunks, strict=True)), self.ttl_seconds)
        texts = [self._envelopes.text(self.job_id, chunk, i, queue) for i, chunk in zip(ids, chunks, strict=True)]
        pipe.lpush(queue, *texts)
        pipe.execute()
        self.images += count
        self.messages += len(chunks)
        return count


def _grouped(chunks: Iterator[list[str]], size: int) -> Iterator[list[list[str]]]:
    while group := list(itertools.islice(chunks, size)):
        yield group


def enqueue_paths(
    client: redis.Redis,
    settings: RedisSettings,
    job_id: str,
    paths: Iterable[str],
    *,
    chunk_size: int,
) -> tuple[int, int]:
    """Enqueue ``paths`` for an existing job (not sealing it); returns (images, messages) sent."""
    ttl = settings.result_ttl_days * 86400
    with Enqueuer(client, producer_app(settings), job_id, chunk_size=chunk_size, ttl_seconds=ttl) as enqueuer:
        enqueuer.add(paths)
        return enqueuer.images, enqueuer.messages
