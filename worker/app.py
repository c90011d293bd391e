"""The worker's Celery app, configured for long GPU work on Redis: JSON only, late acks, sized prefetch."""

from __future__ import annotations

from celery import Celery

from imgpipe.broker import make_celery, task_time_limit
from imgpipe.settings import Settings


def prefetch(settings: Settings) -> int:
    """Messages one worker process holds at once (kombu's prefetch count; ``hold_images`` bounds their images).

    Enough one-image messages for a batch in every lane (worker/batcher.py) and one more group filling.
    """
    if settings.worker.prefetch is not None:
        return settings.worker.prefetch
    return max(2, hold_images(settings))


def hold_images(settings: Settings) -> int:
    """Images one worker process holds at once (delivered, not yet settled): a batch for every lane and one more
    group filling. Counted in images, not messages, so that a chunked job spreads over every worker process and
    host instead of the first one to ask taking a prefetch count of 32-path messages (measured: with 2 processes
    on 2 cores one took every message of a 900-photo job and the other idled; worker/consumer.py ``room``)."""
    return max(1, (settings.batch.decode_threads + 1) * settings.batch.max_batch)


def work_images(settings: Settings) -> int:
    """Images in decode and inference at once per process (the work gate, worker/pipeline.py): a batch per lane."""
    if settings.worker.work_images is not None:
        return settings.worker.work_images
    return max(1, settings.batch.decode_threads * settings.batch.max_batch)


def make_app(settings: Settings) -> Celery:
    """The Celery app of a worker process; tasks are registered by ``worker.tasks.register``."""
    from imgpipe.worker import transport

    transport.install()  # junk in the queue is dropped and counted, not fatal
    app = make_celery("imgpipe-worker", settings.redis)
    limit = task_time_limit(settings.redis)
    app.conf.update(
        # Acknowledge a message only once its records are written; a worker that dies leaves it unacked,
        # and Redis hands it to another worker after the visibility timeout.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Threads, not prefork: one process holds the model. The task's Strategy hands deliveries to the
        # worker's group threads (worker/consumer.py), so the pool itself runs nothing: one thread.
        worker_pool="threads",
        worker_concurrency=1,
        # Messages held at once (kombu's prefetch count = concurrency x multiplier): enough to fill a batch
        # while the previous one runs.
        worker_prefetch_multiplier=prefetch(settings),
        # No Celery requests are tracked (the group threads settle each delivery), so the prefetch reduction
        # after a reconnect, which waits for requests to finish, would never be restored.
        worker_enable_prefetch_count_reduction=False,
        worker_disable_prefetch=False,
        # Below the visibility timeout, so a live message is not redelivered. Celery does not enforce these
        # here (no task runs on its pool): a group gives a message back once `limit` has passed (pipeline.py).
        task_soft_time_limit=limit,
        task_time_limit=limit + 1,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=True,
    )
    return app
