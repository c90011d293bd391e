"""One worker process: load the model, start the batcher and heartbeat, run the Celery consumer until stopped."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from imgpipe.broker import redis_client, safe_url, task_time_limit
from imgpipe.settings import Settings

log = logging.getLogger("imgpipe.worker")


def run_worker(settings: Settings, device: str, loglevel: str, parent_pid: int | None = None) -> int:
    """Load the model, start the batcher and run a Celery worker (threads pool) here until stopped."""
    from imgpipe.broker import publish
    from imgpipe.health import HealthReporter, consumer_connected, health_dir
    from imgpipe.model.engine import Engine
    from imgpipe.registry import Heartbeat, WorkerInfo
    from imgpipe.worker import metrics, metrics_server
    from imgpipe.worker.app import make_app, prefetch
    from imgpipe.worker.batcher import Batcher
    from imgpipe.worker.pipeline import Pipeline, PipelineLimits
    from imgpipe.worker.store import ResultStore
    from imgpipe.worker.sweeper import Sweeper
    from imgpipe.worker.tasks import register

    client = redis_client(settings.redis)
    engine = Engine.load(
        settings.model.resolved_path(),
        device,
        topk=settings.model.topk,
        security=settings.security,
        torch_threads=settings.batch.torch_threads,  # throughput: IMGPIPE_TORCH_THREADS (imgpipe/threads.py)
    )
    metrics.describe_worker(str(engine.device), engine.metadata.name, engine.metadata.sha256)
    server = metrics_server.start_metrics_server(settings.metrics)
    batcher = Batcher(engine, settings.batch).start()
    store = ResultStore(client, settings.redis.result_ttl_days * 86400)
    limits = PipelineLimits(settings.worker.max_deliveries, task_time_limit(settings.redis))
    app = make_app(settings)
    register(app, Pipeline(engine, batcher, store, limits))

    def resend(job_id: str, paths: list[str], message_id: str) -> None:
        publish(app, job_id, paths, message_id)

    sweeper = Sweeper(client, settings.redis.queue, settings.redis.visibility_timeout, resend).start()
    hostname = f"imgpipe-{os.getpid()}@{socket.gethostname()}"
    me = WorkerInfo(
        id=hostname,
        host=socket.gethostname(),
        pid=os.getpid(),
        model=engine.model_id,
        device=str(engine.device),
        queues=(settings.redis.queue,),
        started=time.time(),
    )
    health = HealthReporter(health_dir(settings), me, batcher.health).start()  # read by `imgpipe worker --check`
    heartbeat = Heartbeat(client, me, health.status).start()
    if parent_pid is not None:
        _stop_when_orphaned(parent_pid)
    log.info(
        "imgpipe worker %d: model %s on %s; queue %r at %s; allowed roots %s; batches of up to %d images "
        "(waiting up to %d ms); %d messages at a time%s",
        os.getpid(),
        engine.model_id,
        engine.device,
        settings.redis.queue,
        safe_url(settings.redis.url),
        ":".join(str(r) for r in settings.security.allowed_roots),
        settings.batch.max_batch,
        settings.batch.max_wait_ms,
        prefetch(settings),
        f"; metrics on port {server.port}" if server is not None else "",
    )
    celery_worker = app.Worker(
        hostname=hostname,
        queues=[settings.redis.queue],
        loglevel=loglevel.upper(),
        quiet=True,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        optimization="fair",
    )
    health.connected = lambda: consumer_connected(celery_worker)
    try:
        celery_worker.start()
    finally:
        heartbeat.close()
        health.close()
        sweeper.close()
        batcher.close()
        if server is not None:
            server.close()
        metrics_server.mark_this_process_dead()
        client.close()
    return int(celery_worker.exitcode or 0)


def _stop_when_orphaned(parent_pid: int) -> None:
    """A child worker shuts down (warmly) when its supervisor is gone, even after a kill -9 of it."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        log.warning("supervisor %d is gone; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="imgpipe-orphan-watch", daemon=True).start()
