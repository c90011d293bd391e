"""`imgpipe worker` and `imgpipe exporter`: options and checks only; the work is in worker/run.py (one process),
worker/supervisor.py (one process per GPU) and worker/exporter.py. Imports stay light so that `--help` and
usage errors never load torch or Celery.

With one process (a CPU host, or one GPU) the Celery worker runs here. With more, this process supervises
that many child workers started as fresh interpreters (so CUDA is only ever initialised in a child, one
device each), restarts any that die, and serves their summed /metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from imgpipe import defaults
from imgpipe.devices import parse_device, shared_gpus
from imgpipe.errors import ConfigError
from imgpipe.settings import Settings, setting_option

LOGLEVELS = ("debug", "info", "warning", "error")
# The settings a worker uses (and so validates); the producer's and the exporter's are not read.
WORKER_SECTIONS = ("redis", "model", "batch", "security", "metrics", "worker")


@click.command()
@setting_option("CONCURRENCY", type=click.IntRange(min=1))
@setting_option("DEVICE", help="auto, cpu, cuda or cuda:N; with auto and several processes, GPUs are dealt round-robin")
@setting_option("METRICS_PORT", type=click.IntRange(0, 65535))
@setting_option("METRICS_BIND")
@setting_option("MODEL", type=click.Path(dir_okay=False, path_type=Path))
@setting_option(
    "ALLOWED_ROOTS",
    help="Colon-separated directories this worker may read; required. Paths that resolve elsewhere "
    "(symlinks, ..) become error records and are never opened",
)
@setting_option("REDIS_URL")
@setting_option("MAX_BATCH", type=click.IntRange(min=1), help="Images per inference batch, gathered across messages")
@setting_option("MAX_WAIT_MS", type=click.IntRange(min=0))
@setting_option("DECODE_THREADS", type=click.IntRange(min=1))
@setting_option("PREFETCH", type=click.IntRange(min=1))
@setting_option(
    "PINNED_ONLY",
    flag_value="1",
    help="Consume only the model's own queue (jobs pinned to it with `enqueue --model`), not the default queue",
)
@setting_option("RELOAD", flag_value="1", help="Also reload the model when its file is replaced (SIGHUP always does)")
@click.option("--loglevel", type=click.Choice(LOGLEVELS), default="info", show_default=True, help="Log detail.")
@click.option("--parent-pid", type=int, hidden=True)
@click.option(
    "--check",
    is_flag=True,
    help="Health probe instead of a worker: exit 0 when the worker of this host/container is live, connected "
    "to Redis and making progress (or idle), 1 otherwise. See docs/deploy.md.",
)
@click.option(
    "--liveness",
    is_flag=True,
    help="With --check: only ask whether the worker process is alive and not hung (Redis not consulted).",
)
def worker(loglevel: str, parent_pid: int | None, check: bool, liveness: bool, **overrides: Any) -> None:
    """Classify images from the queue and write their records to Redis, until stopped (Ctrl-C or SIGTERM).

    \b
    Start one per machine (or per GPU) against the same Redis; they share the work:
      IMGPIPE_ALLOWED_ROOTS=/data IMGPIPE_REDIS_URL=redis://queue-host:6379/0 imgpipe worker
    Other settings it honours (environment only): IMGPIPE_QUEUE, IMGPIPE_VISIBILITY_TIMEOUT,
    IMGPIPE_RESULT_TTL_DAYS, IMGPIPE_REDIS_SOCKET_TIMEOUT, IMGPIPE_TOPK, IMGPIPE_MAX_FILE_BYTES,
    IMGPIPE_MAX_PIXELS, IMGPIPE_MAX_DELIVERIES, IMGPIPE_HEALTH_DIR, IMGPIPE_TORCH_THREADS,
    IMGPIPE_CPU_INFER_BATCH, IMGPIPE_SERIAL_DECODE_BYTES, IMGPIPE_MAX_LATENCY_MS, IMGPIPE_ALLOW_HARDLINKS,
    IMGPIPE_LEASE_TTL, IMGPIPE_WORK_IMAGES, IMGPIPE_MAX_MESSAGE_PATHS, IMGPIPE_MAX_MESSAGE_BYTES
    (docs/reliability.md).
    It consumes the default queue plus its model's own (jobs pinned with `enqueue --model`; only that one
    with --pinned-only); SIGHUP (and with --reload a replaced model file) reloads the model between batches,
    keeping the old model if the new file fails its checks (docs/models.md).
    """
    if check or liveness:
        redis_url = {"redis_url": overrides.get("redis_url")}
        sys.exit(_health_check(Settings.from_env(sections=("redis", "worker"), overrides=redis_url), not liveness))
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s] %(message)s")
    settings = Settings.from_env(sections=WORKER_SECTIONS, overrides=overrides)
    if not settings.security.allowed_roots:
        raise ConfigError(
            "no allowed roots: set IMGPIPE_ALLOWED_ROOTS or --allowed-roots to the directories this worker "
            "may read (colon-separated), e.g. --allowed-roots /data/photos"
        )
    model_file = settings.model.resolved_path()
    if not model_file.is_file():
        raise ConfigError(f"model file not found: {model_file} (set IMGPIPE_MODEL or --model)")
    devices = plan_devices(settings.model.device, settings.worker.concurrency)
    for gpu, processes in shared_gpus(devices).items():
        logging.getLogger("imgpipe.worker").warning(
            "%d worker processes will share %s: on one GPU two processes ran 0.2x the images/s of one in the bench "
            "(README, Benchmarks, On a GPU); one process per GPU, its lanes decoding in threads, is the default",
            processes,
            gpu,
        )
    settings = share_cores(settings, len(devices), explicit=lanes_chosen(overrides))
    if len(devices) == 1:
        from imgpipe.worker.run import run_worker

        code = run_worker(settings, devices[0], loglevel, parent_pid)
    else:
        from imgpipe.worker.supervisor import Supervisor

        code = Supervisor(settings, devices, loglevel).run()
    sys.exit(code)


def lanes_chosen(overrides: dict[str, Any]) -> bool:
    """Whether the lanes were chosen (--decode-threads or IMGPIPE_DECODE_THREADS, not 0) rather than defaulted."""
    return bool(overrides.get("decode_threads")) or os.environ.get("IMGPIPE_DECODE_THREADS", "0") not in ("", "0")


def share_cores(settings: Settings, processes: int, *, explicit: bool) -> Settings:
    """``settings`` with the host's cores shared among ``processes`` worker processes: each gets its share of
    the cores as lanes (IMGPIPE_DECODE_THREADS, at least 1) unless the lanes were chosen (``explicit``), and
    its share over its lanes as torch threads unless IMGPIPE_TORCH_THREADS is set. One process keeps them all.
    Several processes on a CPU host each have their own GIL: what serves tiny images fastest there (README,
    Benchmarks)."""
    if processes <= 1:
        return settings
    from imgpipe import threads

    share = max(1, threads.available_cpus() // processes)
    lanes = settings.batch.decode_threads if explicit else share
    torch_threads = settings.batch.torch_threads or max(1, share // lanes)
    batch = dataclasses.replace(settings.batch, decode_threads=lanes, torch_threads=torch_threads)
    return dataclasses.replace(settings, batch=batch)


def _health_check(settings: Settings, readiness: bool) -> int:
    """`imgpipe worker --check [--liveness]`: one line, exit 0 (healthy) or 1."""
    from imgpipe.health import check

    verdict = check(settings, readiness=readiness)
    what = "ready" if readiness else "live"
    if verdict.ok:
        click.echo(f"{what}: {len(verdict.workers)} worker process(es): {', '.join(verdict.workers)}")
        return 0
    click.echo(f"not {what}: {'; '.join(verdict.problems)}", err=True)
    return 1


def plan_devices(device: str, concurrency: int | None) -> list[str]:
    """The device of each worker process: one per GPU (round-robin when asked for more); on the CPU, one per
    core as memory allows (imgpipe/threads.py ``cpu_processes``) unless ``concurrency`` says."""
    from imgpipe import threads

    spec = parse_device(device)
    if spec.index is not None:  # one fixed GPU: each process checks it exists
        return [str(spec)] * (concurrency or 1)
    gpus = 0 if spec.kind == "cpu" else visible_gpus()
    if concurrency is None and spec.resolve(gpus) == "cpu":  # ConfigError for cuda without a GPU
        concurrency = threads.cpu_processes()
    return spec.plan(gpus, concurrency)


def visible_gpus(dev: Path = Path("/dev")) -> int:
    """GPUs torch can use here. A Linux host with no GPU device node (NVIDIA's /dev/nvidia0.., AMD's /dev/kfd)
    has none, known without importing torch: a supervisor of CPU processes stays small (~300 MB less)."""
    if sys.platform == "linux" and not (dev / "kfd").exists() and not any(dev.glob("nvidia[0-9]*")):
        return 0
    import torch  # counting GPUs creates no CUDA context, and children are new interpreters anyway

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@click.command("exporter")
@setting_option(
    "EXPORTER_PORT", "--port", type=click.IntRange(0, 65535), help="Port of /metrics (0: any free port, printed)"
)
@setting_option("EXPORTER_BIND", "--bind", help="Address /metrics binds to")
@setting_option("REDIS_URL", help="Redis holding the queue and jobs")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=defaults.EXPORTER_SAMPLE_S,
    show_default=True,
    help="Seconds between background reads of Redis.",
)
@click.option(
    "--window",
    type=click.FloatRange(min=1.0),
    default=defaults.RATE_WINDOW_S,
    show_default=True,
    help="Seconds of history behind the recent rate and drain time.",
)
def exporter(interval: float, window: float, **overrides: Any) -> None:
    """Serve queue and job metrics from Redis for Prometheus: queue depth, in flight, backlog, recent rate,
    drain time (backlog / recent rate: the signal an autoscaler wants) and dead letters.

    Run one per Redis; it needs neither torch nor a GPU.
    """
    import redis

    from imgpipe.settings import MetricsSettings
    from imgpipe.worker import metrics_server
    from imgpipe.worker.exporter import RedisCollector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(sections=("redis", "exporter"), overrides=overrides)
    redis_settings = settings.redis
    port, bind = settings.exporter.port, settings.exporter.bind
    collector = RedisCollector.from_settings(redis_settings, window=window, interval=interval)
    try:
        collector.sample()
    except redis.RedisError as exc:
        click.echo(f"imgpipe exporter: warning: Redis not reachable yet ({exc}); serving imgpipe_redis_up 0", err=True)
    server = metrics_server.start_metrics_server(
        MetricsSettings(port=port, bind=bind), [collector.start()], worker=False
    )
    assert server is not None  # a port was given
    click.echo(
        f"imgpipe exporter: serving http://{bind}:{server.port}/metrics for queue "
        f"{redis_settings.queue!r} (Ctrl-C to stop)",
        err=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    collector.stop()
    server.close()
