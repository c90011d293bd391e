"""One worker process: load the model, start the group threads, heartbeat and reconciler, run the Celery consumer
(started again if it stops on an error) until stopped."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgpipe import defaults, keys
from imgpipe.broker import redis_client, safe_url, task_time_limit
from imgpipe.settings import Settings

log = logging.getLogger("imgpipe.worker")


def run_worker(settings: Settings, device: str, loglevel: str, parent_pid: int | None = None) -> int:
    """Load the model, start the group threads and run a Celery consumer here until stopped."""
    from celery import signals

    from imgpipe import heap, known_warnings
    from imgpipe.broker import publish
    from imgpipe.health import HealthReporter, consumer_connected, health_dir
    from imgpipe.jobs import job_queue
    from imgpipe.leases import Leases, Reconciler
    from imgpipe.messages import Limits
    from imgpipe.model.engine import Engine
    from imgpipe.registry import Heartbeat, WorkerInfo
    from imgpipe.worker import metrics, metrics_server, transport
    from imgpipe.worker.app import hold_images, make_app, prefetch, work_images
    from imgpipe.worker.batcher import Batcher
    from imgpipe.worker.consumer import Runner
    from imgpipe.worker.pipeline import Pipeline, PipelineLimits, WorkGate
    from imgpipe.worker.store import ResultStore
    from imgpipe.worker.tasks import register

    # Far above the lease, group and alone threads plus heartbeat, reconciler and consumer: no MaxConnectionsError.
    client = redis_client(settings.redis, max_connections=prefetch(settings) + 16)

    def load_engine(path: Path) -> Engine:  # at start and on each reload; the group threads are the lanes
        return Engine.from_settings(settings, path, device)

    engine = load_engine(settings.model.resolved_path())
    metrics.describe_worker(str(engine.device), engine.metadata.name, engine.metadata.sha256)
    server = metrics_server.start_metrics_server(settings.metrics)
    batcher = Batcher(engine, settings.batch)
    ttl = settings.redis.result_ttl_days * 86400
    store = ResultStore(client, ttl)
    hostname = f"imgpipe-{os.getpid()}@{socket.gethostname()}"
    leases = Leases(client, hostname, settings.worker.lease_ttl, ttl)
    limits = PipelineLimits(settings.worker.max_deliveries, task_time_limit(settings.redis))
    app = make_app(settings)

    def send_to_job_queue(job_id: str, paths: list[str], message_id: str) -> None:
        publish(app, job_id, paths, message_id, queue=job_queue(client, job_id, settings.redis.queue))

    gate = WorkGate(work_images(settings))
    pipeline = Pipeline(engine, batcher, store, leases, limits, gate, redirect=send_to_job_queue)
    message_limits = Limits(settings.worker.max_message_paths, settings.worker.max_message_bytes)
    lanes = settings.batch.decode_threads  # group threads that decode and predict their own batches
    runner = Runner(
        pipeline, message_limits, settings.batch.max_batch, threads=lanes + 1, hold_images=hold_images(settings)
    ).start()
    # Fetch by the images held as well as the messages (worker/app.py), and by the plan under a latency target.
    transport.hold_by(runner.room, runner.saw_backlog, runner.images_left)
    register(app, pipeline, message_limits, runner)
    app.steps["consumer"].add(_drain_step(runner, pipeline.stopping, limits.time_limit))

    def resend(job_id: str, paths: list[str], message_id: str) -> None:  # to the job's queue (pinned: its model's)
        send_to_job_queue(job_id, paths, message_id)
        metrics.RESENT.labels(cause="reconciler").inc()

    def own_queue(served: Engine) -> str:  # the queue of jobs pinned to the model served
        return keys.model_queue(served.metadata.sha256[:12])

    def queues_for(served: Engine) -> tuple[str, ...]:  # the default queue (unless pinned only), the model's own
        return (own_queue(served),) if settings.worker.pinned_only else (settings.redis.queue, own_queue(served))

    reconciler = Reconciler(client, settings.redis.queue, resend, owner=hostname)
    stop = threading.Event()
    reconcile_thread = threading.Thread(
        target=_reconcile_loop, args=(reconciler, stop), name="imgpipe-reconciler", daemon=True
    )
    reconcile_thread.start()
    me = WorkerInfo(
        id=hostname,
        host=socket.gethostname(),
        pid=os.getpid(),
        model=engine.model_id,
        device=str(engine.device),
        queues=queues_for(engine),
        started=time.time(),
    )

    def status() -> dict[str, Any]:  # the heartbeat follows a reload: model (and queues) from the next beat
        return {**batcher.health(), "model": batcher.engine.model_id, "queues": queues_for(batcher.engine)}

    reload_lock = threading.Lock()
    consuming: dict[str, Any] = {}  # the running Celery worker, for re-subscribing after a reload

    def reload_model() -> None:
        """Load the model file again and switch to it between batches; a file that fails its checks is refused
        and the old model kept."""
        with reload_lock:
            old = batcher.engine
            path = settings.model.resolved_path()
            try:
                new = load_engine(path)
            except Exception as exc:  # not ours, tampered, truncated, wrong device: keep serving the old one
                reason = (str(exc).splitlines() or [exc.__class__.__name__])[0]
                log.error("model reload refused (%s): %s; still serving %s", path, reason, old.model_id)
                return
            if new.model_id == old.model_id:
                log.info("model reload: %s is unchanged (%s)", path, old.model_id)
                return
            batcher.engine = new
            pipeline.engine = new
            _resubscribe(consuming.get("worker"), own_queue(old), own_queue(new))
            metrics.MODEL_INFO.labels(name=old.metadata.name, sha=old.metadata.sha256[:12]).set(0)
            metrics.describe_worker(str(new.device), new.metadata.name, new.metadata.sha256)
            log.warning("model reloaded: %s -> %s", old.model_id, new.model_id)
            heap.settle()  # the old model's objects are released, the new one's frozen

    def on_hup(_signum: int, _frame: Any) -> None:  # loads off the signal handler (and off the batch thread)
        threading.Thread(target=reload_model, name="imgpipe-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, on_hup)
    watcher = _watch_model(settings.model.resolved_path(), reload_model) if settings.worker.reload else None
    health = HealthReporter(health_dir(settings), me, status).start()  # read by `imgpipe worker --check`
    heartbeat = Heartbeat(client, me, health.status, on_beat=leases.renew).start()
    if parent_pid is not None:
        _stop_when_orphaned(parent_pid)

    def on_shutdown(**_: Any) -> None:  # SIGTERM/SIGINT: messages not started are given back at once
        pipeline.stopping.set()

    signals.worker_shutting_down.connect(on_shutdown, weak=False)
    # Once the consumer is up, everything loaded so far is out of the collector's reach (imgpipe/heap.py).
    signals.worker_ready.connect(lambda **_: heap.settle(), weak=False)
    log.info(
        "imgpipe worker %d: model %s on %s; queues %s at %s; allowed roots %s; batches of up to %d images "
        "(waiting up to %d ms); %d messages and %d images held at a time, %d images in work%s",
        os.getpid(),
        engine.model_id,
        engine.device,
        ", ".join(queues_for(engine)),
        safe_url(settings.redis.url),
        ":".join(str(r) for r in settings.security.allowed_roots),
        settings.batch.max_batch,
        settings.batch.max_wait_ms,
        prefetch(settings),
        hold_images(settings),
        work_images(settings),
        f"; metrics on port {server.port}" if server is not None else "",
    )
    known_warnings.install()  # Celery's root warning and masked-URL noise handled in one place
    code = 0
    try:
        while True:
            celery_worker = app.Worker(
                hostname=hostname,
                queues=list(queues_for(batcher.engine)),
                loglevel=loglevel.upper(),
                quiet=True,
                without_gossip=True,
                without_mingle=True,
                without_heartbeat=True,
                optimization="fair",
            )
            health.connected = functools.partial(consumer_connected, celery_worker)
            consuming["worker"] = celery_worker
            _keep_hup(celery_worker, on_hup)
            celery_worker.start()
            code = int(celery_worker.exitcode or 0)
            if code == 0 or pipeline.stopping.is_set():
                break
            # The consumer stopped on an error (e.g. kombu's AttributeError while reconnecting to a restarted
            # Redis): start it again rather than leave the worker dead.
            log.error("the consumer stopped (exit code %d); starting it again", code)
            time.sleep(defaults.CONSUMER_RESTART_S)
    finally:
        stop.set()
        if watcher is not None:
            watcher.stop()
        heartbeat.close()
        health.close()
        runner.close()
        if server is not None:
            server.close()
        metrics_server.mark_this_process_dead()
        client.close()
    return code


def _drain_step(runner: Any, stopping: threading.Event, limit: float) -> type:
    """A consumer bootstep stopped before the task consumer and the broker connection: on a real shutdown
    (``stopping`` set by SIGTERM/SIGINT), wait for the messages in work to be recorded and acknowledged and the
    others given back, while the connection is still open. A consumer restarting after a lost connection also
    stops its steps: then nothing waits (groups in work go on, on the worker's own Redis client)."""
    from celery import bootsteps

    class Drain(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)
        name = "imgpipe.drain"

        def stop(self, parent: Any) -> None:
            if stopping.is_set():
                runner.drain(limit + defaults.DRAIN_MARGIN_S)

        shutdown = stop

    return Drain


def _resubscribe(celery_worker: Any, old_queue: str, new_queue: str) -> None:
    """Stop taking the old model's queue and take the new one's, in the consumer's own event loop. Messages of
    the old queue already prefetched are sent back to it by the pipeline's pin check."""
    consumer = getattr(celery_worker, "consumer", None)
    hub = getattr(consumer, "hub", None)
    if old_queue == new_queue or consumer is None or hub is None:
        return  # not consuming yet: the next start takes queues_for(the new engine)

    def switch() -> None:
        consumer.cancel_task_queue(old_queue)
        consumer.add_task_queue(new_queue)

    hub.call_soon(switch)


def _watch_model(path: Path, reload: Callable[[], None]) -> Any:
    """Reload when ``path`` is replaced or rewritten (watchdog on its folder; ``*.tmp`` files are ignored, so
    an export's rename is one event), once the file has been quiet for RELOAD_SETTLE_S seconds."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    target = os.path.abspath(path)
    pending: list[threading.Timer] = []
    lock = threading.Lock()

    class Changed(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type not in ("created", "moved", "modified", "closed"):
                return
            touched = {os.path.abspath(os.fsdecode(p)) for p in (event.src_path, getattr(event, "dest_path", "")) if p}
            if target not in touched:
                return
            with lock:  # debounce: one reload after the last event
                for timer in pending:
                    timer.cancel()
                pending.clear()
                timer = threading.Timer(defaults.RELOAD_SETTLE_S, reload)
                timer.daemon = True
                timer.start()
                pending.append(timer)

    observer = Observer()
    observer.schedule(Changed(), os.path.dirname(target), recursive=False)
    observer.daemon = True
    observer.start()
    log.info("watching %s: the model reloads when the file is replaced", target)
    return observer


def _keep_hup(celery_worker: Any, handler: Any) -> None:
    """Celery installs a SIGHUP handler that re-executes the worker; SIGHUP reloads the model here instead."""
    install = celery_worker.install_platform_tweaks

    def tweaks(worker: Any) -> None:
        install(worker)
        signal.signal(signal.SIGHUP, handler)

    celery_worker.install_platform_tweaks = tweaks


def _reconcile_loop(reconciler: Any, stop: threading.Event) -> None:
    import redis

    while not stop.wait(defaults.RECONCILE_S):
        try:
            reconciler.run_once(lock_s=defaults.RECONCILE_S * 0.9)
        except (redis.RedisError, OSError) as exc:
            log.warning("reconciling leases failed: %s", exc)
        except Exception:
            log.exception("reconciling leases failed")


def _stop_when_orphaned(parent_pid: int) -> None:
    """A child worker shuts down (warmly) when its supervisor is gone, even after a kill -9 of it."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        log.warning("supervisor %d is gone; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="imgpipe-orphan-watch", daemon=True).start()
