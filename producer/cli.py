"""`imgpipe enqueue`, `watch`, `status` and `results`: the producer side of the CLI (no torch, no worker)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import click
import redis
from tqdm import tqdm

from imgpipe import defaults
from imgpipe.errors import ConfigError
from imgpipe.jobs import JobStatus, create_job, iter_records, job_status, job_statuses, seal_job
from imgpipe.records import FORMATS, RecordWriter, format_for
from imgpipe.scan import scan_all
from imgpipe.settings import Settings, setting_option

redis_url_option = setting_option("REDIS_URL")
# What the producer commands read (and so validate): never the worker's batch, model or security settings.
PRODUCER_SECTIONS = ("redis", "producer")


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(sections=PRODUCER_SECTIONS, overrides=overrides)


def _say(message: str) -> None:
    click.echo(f"imgpipe: {message}", err=True)


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--job", "job_id", help="Job id to create (letters, digits, . _ -).  [default: time-based]")
@setting_option("CHUNK_SIZE", type=click.IntRange(min=1), help="Paths per queue message")
@click.option("--wait", is_flag=True, help="Show progress and exit when the job is done (exit 1 if any image failed).")
@redis_url_option
def enqueue(
    paths: tuple[Path, ...], job_id: str | None, chunk_size: int | None, wait: bool, redis_url: str | None
) -> None:
    """Scan folders (recursively) for images, create a job and enqueue them; prints the job id.

    Files named directly are enqueued whatever their extension. Workers must be able to read the paths:
    on other machines, mount the data at the same path.
    """
    from imgpipe.broker import redis_client  # Celery: imported only when the command runs
    from imgpipe.producer.enqueue import Enqueuer, producer_app

    settings = _settings(redis_url=redis_url, chunk_size=chunk_size)
    client = redis_client(settings.redis)
    roots = [str(p.absolute()) for p in paths]
    for path in paths:
        if not path.exists() and not path.is_symlink():
            raise ConfigError(f"no such file or directory: {path}")
    ttl = settings.redis.result_ttl_days * 86400
    job_id = create_job(client, job_id, kind="batch", roots=roots, ttl_seconds=ttl)
    click.echo(job_id)
    sys.stdout.flush()
    started = time.monotonic()
    skipped: list[str] = []
    app = producer_app(settings.redis)
    enqueuer = Enqueuer(client, app, job_id, chunk_size=settings.producer.chunk_size, ttl_seconds=ttl)
    try:
        with enqueuer:
            enqueuer.add(scan_all(paths, on_error=lambda p, e: skipped.append(f"{p}: {e.strerror or e}")))
    finally:
        seal_job(client, job_id)  # even when interrupted: what was sent can still finish
    elapsed = max(time.monotonic() - started, 1e-9)
    for line in skipped[:10]:
        _say(f"skipped unreadable {line}")
    if len(skipped) > 10:
        _say(f"... and {len(skipped) - 10} more unreadable folders")
    if enqueuer.images == 0:
        _say(
            f"no image files found under {', '.join(map(str, paths))} (extensions: "
            f"{' '.join(defaults.IMAGE_EXTENSIONS)})"
        )
    _say(
        f"job {job_id}: enqueued {enqueuer.images} images in {enqueuer.messages} messages "
        f"({enqueuer.images / elapsed:,.0f} paths/s)"
    )
    if wait:
        status = _follow(client, job_id)
        _say(_summary(status))
        sys.exit(1 if status.failed else 0)


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--job", "job_id", help="Job id to create.  [default: time-based]")
@click.option("--existing", is_flag=True, help="Also enqueue the images already in DIRECTORY.")
@setting_option(
    "WATCH_SETTLE_MS",
    "--settle-ms",
    type=click.IntRange(min=0),
    help="Quiet time (ms) before a file without a close event counts as written",
)
@redis_url_option
def watch(
    directory: Path, job_id: str | None, existing: bool, watch_settle_ms: int | None, redis_url: str | None
) -> None:
    """Streaming: enqueue each new image file under DIRECTORY once it is completely written, until stopped.

    Prints the job id; one message per image, which workers batch together. Ctrl-C (or SIGTERM) stops it,
    saying how many images it sent.
    """
    from imgpipe.broker import redis_client
    from imgpipe.producer.enqueue import Enqueuer, producer_app
    from imgpipe.producer.watch import Watcher

    settings = _settings(redis_url=redis_url, watch_settle_ms=watch_settle_ms)
    if not directory.is_dir():
        raise ConfigError(f"not a directory: {directory}")
    root = str(directory.absolute())
    settle = settings.producer.watch_settle_ms / 1000
    client = redis_client(settings.redis)
    ttl = settings.redis.result_ttl_days * 86400
    job_id = create_job(client, job_id, kind="stream", roots=[root], ttl_seconds=ttl)
    click.echo(job_id)
    sys.stdout.flush()
    stop = threading.Event()
    app = producer_app(settings.redis)
    watcher = Watcher(root, on_ready=lambda path: None, settle_s=settle)
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            with Enqueuer(client, app, job_id, chunk_size=1, ttl_seconds=ttl) as single:

                def send(path: str) -> None:
                    single.add([path])

                watcher.on_ready = send
                watcher.run(stop)
        except BaseException as exc:
            failure.append(exc)
            stop.set()

    with _stop_on_signals(stop):
        runner = threading.Thread(target=stream, name="imgpipe-watch", daemon=True)
        runner.start()
        _say(f"watching {root} for new images (job {job_id}); Ctrl-C to stop")
        if existing:
            with Enqueuer(client, app, job_id, chunk_size=settings.producer.chunk_size, ttl_seconds=ttl) as bulk:
                for path in scan_all([root]):
                    watcher.mark_sent(path)
                    bulk.add([path])
            _say(f"enqueued {bulk.images} images already there")
        reported, last_report = 0, time.monotonic()
        while not stop.wait(1.0):
            sent = len(watcher.sent)
            if sent != reported and (sys.stderr.isatty() or time.monotonic() - last_report >= 10):
                _say(f"sent {sent} images so far")
                reported, last_report = sent, time.monotonic()
        runner.join(timeout=10)
    seal_job(client, job_id)
    _say(f"watch stopped: sent {len(watcher.sent)} images to job {job_id}")
    if failure:
        raise ConfigError(f"watch failed: {failure[0].__class__.__name__}: {failure[0]}")


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` instead of raising in the middle of a send."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@click.command()
@click.argument("job_id", metavar="[JOB]", required=False)
@click.option("--watch", "live", is_flag=True, help="Keep refreshing (a progress bar for one job).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job instead of text.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Jobs listed without JOB.")
@redis_url_option
def status(job_id: str | None, live: bool, as_json: bool, limit: int, redis_url: str | None) -> None:
    """Job progress: total, done, failed, rate and ETA; every recent job when no JOB is given."""
    from imgpipe.broker import redis_client

    client = redis_client(_settings(redis_url=redis_url).redis)
    if job_id is not None:
        job = job_status(client, job_id)
        if live and not job.finished:
            job = _follow(client, job_id)
        click.echo(json.dumps(job.as_dict()) if as_json else _describe(job))
        return
    while True:
        jobs = job_statuses(client, limit=limit)
        if as_json:
            for job in jobs:
                click.echo(json.dumps(job.as_dict()))
        else:
            if live and sys.stdout.isatty():
                click.clear()
            click.echo(_table(jobs))
        if not live:
            return
        try:
            time.sleep(max(defaults.STATUS_REFRESH_S, 1.0))
        except KeyboardInterrupt:
            return


@click.command()
@click.argument("job_id", metavar="JOB")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (.jsonl or .csv); stdout when omitted.",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Output format.  [default: from the extension]")
@redis_url_option
def results(job_id: str, output: Path | None, fmt: str | None, redis_url: str | None) -> None:
    """Export a job's records (one per image, in no particular order) as JSONL or CSV."""
    from imgpipe.broker import redis_client

    client = redis_client(_settings(redis_url=redis_url).redis)
    job = job_status(client, job_id)
    chosen = format_for(output, fmt)
    count = 0
    if output is None:
        writer = RecordWriter(sys.stdout, chosen)
        count = writer.write_all(iter_records(client, job_id))
    else:
        partial = output.with_name(output.name + ".partial")
        with open(partial, "w", encoding="utf-8", newline="") as stream:
            count = RecordWriter(stream, chosen).write_all(iter_records(client, job_id))
        partial.replace(output)
    if not job.finished:
        _say(f"job {job_id} is not finished: {count} of {job.total} images have records so far")
    elif output is not None:
        _say(f"wrote {count} records to {output}")


def _follow(client: redis.Redis, job_id: str) -> JobStatus:
    """A progress bar on stderr until the job is finished; returns its final status."""
    job = job_status(client, job_id)
    # tqdm draws only on a terminal (disable=None), so logs of scripted runs stay clean.
    bar = tqdm(total=job.total, unit="img", desc=job_id, file=sys.stderr, dynamic_ncols=True, disable=None)
    with bar:
        while True:
            bar.total = job.total
            bar.n = job.done + job.failed
            bar.set_postfix(failed=job.failed, refresh=False)
            bar.refresh()
            if job.finished:
                return job
            time.sleep(defaults.STATUS_REFRESH_S)
            job = job_status(client, job_id)


def _summary(job: JobStatus) -> str:
    return f"job {job.job_id} {job.state}: {job.done} ok, {job.failed} failed of {job.total}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.1f}/s"


def _describe(job: JobStatus) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.progress.created))
    rows = [
        ("job", job.job_id),
        ("state", job.state),
        ("kind", job.kind),
        ("total", str(job.total)),
        ("done", str(job.done)),
        ("failed", str(job.failed)),
        ("rate", _rate(job.rate)),
        ("eta", _duration(job.eta)),
        ("created", created),
    ]
    return "\n".join(f"{name:<8} {value}" for name, value in rows)


def _table(jobs: list[JobStatus]) -> str:
    if not jobs:
        return "no jobs (imgpipe enqueue DIR creates one)"
    header = f"{'JOB':<26} {'STATE':<10} {'TOTAL':>9} {'DONE':>9} {'FAILED':>7} {'RATE':>11} {'ETA':>9}"
    lines = [header]
    for job in jobs:
        lines.append(
            f"{job.job_id:<26} {job.state:<10} {job.total:>9} {job.done:>9} {job.failed:>7} "
            f"{_rate(job.rate):>11} {_duration(job.eta):>9}"
        )
    return "\n".join(lines)
