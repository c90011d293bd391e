"""`imgpipe worker`: consume the queue with the model loaded once per process; one process per GPU by default.

With one process (a CPU host, or one GPU) the Celery worker runs here. With more, this process supervises
that many child workers started as fresh interpreters (so CUDA is only ever initialised in a child, one
device each), restarts any that die, and serves their summed /metrics.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

import click

from imgpipe import defaults
from imgpipe.broker import redis_client, safe_url, task_time_limit
from imgpipe.devices import parse_device
from imgpipe.errors import ConfigError
from imgpipe.procs import imgpipe_argv
from imgpipe.settings import Settings, parse_roots

log = logging.getLogger("imgpipe.worker")

# prometheus_client's variable (imgpipe.worker.metrics.MULTIPROC_ENV), set here before prometheus_client is imported.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds a child must have run for its exit not to count as a failure to start.
_MIN_CHILD_UPTIME_S = 10.0
# Failures to start in a row (backing off 2, 4, 8... s between them) before the supervisor gives up.
_MAX_QUICK_FAILURES = 5
LOGLEVELS = ("debug", "info", "warning", "error")


@click.command()
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    envvar="IMGPIPE_CONCURRENCY",
    show_envvar=True,
    help="Worker processes, each with its own copy of the model.  [default: one per GPU; one on a "
    "CPU host, using all cores]",
)
@click.option(
    "--device",
    envvar="IMGPIPE_DEVICE",
    show_envvar=True,
    help="auto, cpu, cuda or cuda:N; with auto and several processes, GPUs are dealt round-robin.  [default: auto]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    envvar="IMGPIPE_METRICS_PORT",
    show_envvar=True,
    help="Serve Prometheus /metrics on this port (0: any free port).",
)
@click.option(
    "--metrics-bind",
    envvar="IMGPIPE_METRICS_BIND",
    show_envvar=True,
    help=f"Address /metrics binds to.  [default: {defaults.METRICS_BIND}]",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="IMGPIPE_MODEL",
    show_envvar=True,
    help="Model file (TorchScript from `imgpipe train`).  [default: the demo model]",
)
@click.option(
    "--allowed-roots",
    envvar="IMGPIPE_ALLOWED_ROOTS",
    show_envvar=True,
    help="Colon-separated directories this worker may read; required. Paths that resolve elsewhere "
    "(symlinks, ..) become error records and are never opened.",
)
@click.option(
    "--redis-url",
    envvar="IMGPIPE_REDIS_URL",
    show_envvar=True,
    help="Broker and result store.  [default: redis://localhost:6379/0]",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    envvar="IMGPIPE_MAX_BATCH",
    show_envvar=True,
    help=f"Images per inference batch, gathered across messages.  [default: {defaults.MAX_BATCH}]",
)
@click.option(
    "--max-wait-ms",
    type=click.IntRange(min=0),
    envvar="IMGPIPE_MAX_WAIT_MS",
    show_envvar=True,
    help=f"Longest wait for a batch to fill before running it partly full.  [default: {defaults.MAX_WAIT_MS}]",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    envvar="IMGPIPE_PREFETCH",
    show_envvar=True,
    help="Messages one process holds at once.  [default: 2 x max batch]",
)
@click.option("--loglevel", type=click.Choice(LOGLEVELS), default="info", show_default=True)
@click.option("--parent-pid", type=int, hidden=True)
def worker(
    concurrency: int | None,
    device: str | None,
    metrics_port: int | None,
    metrics_bind: str | None,
    model_path: Path | None,
    allowed_roots: str | None,
    redis_url: str | None,
    max_batch: int | None,
    max_wait_ms: int | None,
    prefetch: int | None,
    loglevel: str,
    parent_pid: int | None,
) -> None:
    """Classify images from the queue and write their records to Redis, until stopped (Ctrl-C or SIGTERM).

    \b
    Start one per machine (or per GPU) against the same Redis; they share the work:
      IMGPIPE_ALLOWED_ROOTS=/data IMGPIPE_REDIS_URL=redis://queue-host:6379/0 imgpipe worker
    """
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s] %(message)s")
    settings = Settings.from_env()
    settings = settings.with_section(
        redis=replace(settings.redis, url=redis_url or settings.redis.url),
        model=replace(settings.model, path=model_path or settings.model.path, device=device or settings.model.device),
        batch=replace(
            settings.batch,
            max_batch=max_batch if max_batch is not None else settings.batch.max_batch,
            max_wait_ms=max_wait_ms if max_wait_ms is not None else settings.batch.max_wait_ms,
        ),
        security=replace(
            settings.security,
            allowed_roots=parse_roots(allowed_roots, "--allowed-roots")
            if allowed_roots
            else settings.security.allowed_roots,
        ),
        metrics=replace(
            settings.metrics,
            port=metrics_port if metrics_port is not None else settings.metrics.port,
            bind=metrics_bind or settings.metrics.bind,
        ),
        worker=replace(
            settings.worker,
            concurrency=concurrency if concurrency is not None else settings.worker.concurrency,
            prefetch=prefetch if prefetch is not None else settings.worker.prefetch,
        ),
    )
    if not settings.security.allowed_roots:
        raise ConfigError(
            "no allowed roots: set IMGPIPE_ALLOWED_ROOTS or --allowed-roots to the directories this worker "
            "may read (colon-separated), e.g. --allowed-roots /data/photos"
        )
    model_file = settings.model.resolved_path()
    if not model_file.is_file():
        raise ConfigError(f"model file not found: {model_file} (set IMGPIPE_MODEL or --model)")
    devices = plan_devices(settings.model.device, settings.worker.concurrency)
    if len(devices) == 1:
        code = run_worker(settings, devices[0], loglevel, parent_pid)
    else:
        code = Supervisor(settings, devices, loglevel).run()
    sys.exit(code)


def plan_devices(device: str, concurrency: int | None) -> list[str]:
    """The device of each worker process: one per GPU (round-robin when asked for more), else the CPU."""
    spec = parse_device(device)
    if spec.kind == "cpu" or spec.index is not None:  # one fixed device: each process checks it exists
        return [str(spec)] * (concurrency or 1)
    import torch  # counting GPUs here creates no CUDA context, and children are new interpreters anyway

    return spec.plan(torch.cuda.device_count() if torch.cuda.is_available() else 0, concurrency)


def run_worker(settings: Settings, device: str, loglevel: str, parent_pid: int | None = None) -> int:
    """Load the model, start the batcher and run a Celery worker (threads pool) here until stopped."""
    from imgpipe.broker import publish
    from imgpipe.model.engine import Engine
    from imgpipe.registry import Heartbeat, WorkerInfo
    from imgpipe.worker import metrics
    from imgpipe.worker.app import make_app, prefetch
    from imgpipe.worker.batcher import Batcher
    from imgpipe.worker.pipeline import Pipeline, PipelineLimits
    from imgpipe.worker.store import ResultStore
    from imgpipe.worker.sweeper import Sweeper
    from imgpipe.worker.tasks import register

    client = redis_client(settings.redis)
    engine = Engine.load(settings.model.resolved_path(), device, topk=settings.model.topk, security=settings.security)
    metrics.describe_worker(str(engine.device), engine.metadata.name, engine.metadata.sha256)
    server = metrics.start_metrics_server(settings.metrics)
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
    heartbeat = Heartbeat(client, me, batcher.health).start()
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
    try:
        celery_worker.start()
    finally:
        heartbeat.close()
        sweeper.close()
        batcher.close()
        if server is not None:
            server.close()
        metrics.mark_this_process_dead()
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


class Supervisor:
    """Runs one child `imgpipe worker` per device, restarts those that crash, and serves their metrics."""

    def __init__(self, settings: Settings, devices: list[str], loglevel: str) -> None:
        self.settings = settings
        self.devices = devices
        self.loglevel = loglevel
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.restarts: dict[int, float] = {}  # index -> when to start it again
        self.quick_failures: dict[int, int] = {}
        self.stopping = False
        self.exit_code = 0
        self.metrics_dir = tempfile.mkdtemp(prefix="imgpipe-metrics-")

    def run(self) -> int:
        os.environ[_MULTIPROC_ENV] = self.metrics_dir  # for this process's collector and every child
        from imgpipe.worker import metrics

        server = metrics.start_metrics_server(self.settings.metrics)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "imgpipe worker supervisor %d: %d processes on %s%s",
            os.getpid(),
            len(self.devices),
            ", ".join(self.devices),
            f"; metrics on port {server.port}" if server is not None else "",
        )
        try:
            for index in range(len(self.devices)):
                self._spawn(index)
            while self.children or self.restarts:
                time.sleep(0.2)
                self._reap()
        finally:
            for child, _ in self.children.values():
                child.kill()
            if server is not None:
                server.close()
        return self.exit_code

    def _command(self, index: int) -> list[str]:
        s = self.settings
        command = [
            *imgpipe_argv("worker"),
            "--concurrency",
            "1",
            "--device",
            self.devices[index],
            "--model",
            str(s.model.resolved_path()),
            "--allowed-roots",
            os.pathsep.join(str(r) for r in s.security.allowed_roots),
            "--max-batch",
            str(s.batch.max_batch),
            "--max-wait-ms",
            str(s.batch.max_wait_ms),
            "--loglevel",
            self.loglevel,
            "--parent-pid",
            str(os.getpid()),
        ]
        if s.worker.prefetch is not None:
            command += ["--prefetch", str(s.worker.prefetch)]
        return command

    def _spawn(self, index: int) -> None:
        env = dict(os.environ)
        env["IMGPIPE_METRICS_PORT"] = ""  # the supervisor serves them all
        env["IMGPIPE_REDIS_URL"] = self.settings.redis.url  # not on the command line: it may hold a password
        if self.devices[index] == "cpu":
            # Share the cores between the CPU processes instead of each using all of them.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.devices)))
        child = subprocess.Popen(self._command(index), env=env)
        self.children[index] = (child, time.monotonic())
        log.info("worker process %d (pid %d) on %s started", index, child.pid, self.devices[index])

    def _reap(self) -> None:
        now = time.monotonic()
        for index, (child, started) in list(self.children.items()):
            code = child.poll()
            if code is None:
                continue
            del self.children[index]
            if self.stopping:
                continue
            if code == 2:  # a configuration error: another try would fail the same way
                log.error("worker process %d (pid %d) could not start; stopping", index, child.pid)
                self.exit_code = 2
                self._stop_children()
                continue
            quick = now - started < _MIN_CHILD_UPTIME_S
            self.quick_failures[index] = self.quick_failures.get(index, 0) + 1 if quick else 0
            if self.quick_failures[index] > _MAX_QUICK_FAILURES:
                log.error("worker process %d keeps exiting right after it starts (exit %d); stopping", index, code)
                self.exit_code = 1
                self._stop_children()
                continue
            delay = min(30.0, 2.0 ** self.quick_failures[index])
            log.warning(
                "worker process %d (pid %d) exited with %d; starting another in %.0f s", index, child.pid, code, delay
            )
            self.restarts[index] = now + delay
        for index, when in list(self.restarts.items()):
            if self.stopping:
                del self.restarts[index]
            elif now >= when:
                del self.restarts[index]
                self._spawn(index)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:  # a second Ctrl-C: do not wait for running batches
            for child, _ in self.children.values():
                child.kill()
            return
        log.info("stopping %d worker processes (they finish the messages they hold)", len(self.children))
        self._stop_children()

    def _stop_children(self) -> None:
        self.stopping = True
        for child, _ in self.children.values():
            if child.poll() is None:
                child.terminate()
