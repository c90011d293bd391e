"""`imgpipe enqueue`, `watch`, `status` and `results`: the producer side of the CLI (no torch, no worker)."""

from __future__ import annotations

import collections
import itertools
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click
import redis
from tqdm import tqdm

from imgpipe import defaults
from imgpipe.errors import ConfigError
from imgpipe.jobs import (
    JobStatus,
    RateWindow,
    cancel_job,
    check_pin,
    create_job,
    delete_job,
    failure_reasons,
    iter_records,
    job_status,
    job_statuses,
    pin_queue,
    seal_job,
)
from imgpipe.output import output_file
from imgpipe.records import FORMATS, RecordWriter, format_for
from imgpipe.registry import WorkerInfo, live_workers
from imgpipe.scan import no_images_message, scan_all
from imgpipe.settings import Settings, honours, setting_option

redis_url_option = setting_option("REDIS_URL")
# What the producer commands read (and so validate): never the worker's batch, model or security settings.
PRODUCER_SECTIONS = ("redis", "producer")


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(sections=PRODUCER_SECTIONS, overrides=overrides)


def _say(message: str) -> None:
    click.echo(f"imgpipe: {message}", err=True)


@honours(*PRODUCER_SECTIONS, exclude=("WATCH_SETTLE_MS", "WATCH_RESCAN_S"))
@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--job", "job_id", help="Job id to create (letters, digits, . _ -).  [default: time-based]")
@setting_option("CHUNK_SIZE", type=click.IntRange(min=1), help="Paths per queue message")
@click.option("--wait", is_flag=True, help="Show progress and exit when the job is done (exit 1 if any image failed).")
@click.option(
    "--model",
    "pin",
    metavar="NAME@SHA12",
    help="Pin the job to one model (its id, as `imgpipe model info` prints it): only workers serving it take it.",
)
@redis_url_option
def enqueue(
    paths: tuple[Path, ...],
    job_id: str | None,
    chunk_size: int | None,
    wait: bool,
    pin: str | None,
    redis_url: str | None,
) -> None:
    """Scan folders (recursively) for images, create a job and enqueue them; prints the job id.

    Files named directly are enqueued whatever their extension; folders with no image file are refused
    (exit 2, no job created). Workers must be able to read the paths (IMGPIPE_ALLOWED_ROOTS on the worker):
    on other machines, mount the data at the same path. With --wait, the failed images are summed up by
    reason at the end.
    """
    from imgpipe.broker import redis_client  # Celery: imported only when the command runs
    from imgpipe.producer.enqueue import Enqueuer, producer_app

    settings = _settings(redis_url=redis_url, chunk_size=chunk_size)
    if pin is not None:
        check_pin(pin)
    client = redis_client(settings.redis)
    roots = [str(p.absolute()) for p in paths]
    for path in paths:
        if not path.exists() and not path.is_symlink():
            raise ConfigError(f"no such file or directory: {path}")
    started = time.monotonic()
    skipped: list[str] = []
    found = scan_all(paths, on_error=lambda p, e: skipped.append(f"{p}: {e.strerror or e}"))
    first = next(found, None)  # an empty folder creates no job
    _report_skipped(skipped)
    if first is None:
        raise ConfigError(no_images_message(paths))
    ttl = settings.redis.result_ttl_days * 86400
    job_id = create_job(client, job_id, kind="batch", roots=roots, ttl_seconds=ttl, pin=pin)
    click.echo(job_id)
    sys.stdout.flush()
    queue = pin_queue(pin, settings.redis.queue)
    if pin and not any(queue in w.queues for w in live_workers(client)):
        _say(f"no live worker serves {pin} yet: the job waits for one (imgpipe worker with that model)")
    app = producer_app(settings.redis)
    enqueuer = Enqueuer(
        client, app, job_id, chunk_size=settings.producer.chunk_size, ttl_seconds=ttl, queue=queue if pin else None
    )
    reported = len(skipped)
    try:
        with enqueuer:
            enqueuer.add(itertools.chain([first], found))
    finally:
        seal_job(client, job_id)  # even when interrupted: what was sent can still finish
    elapsed = max(time.monotonic() - started, 1e-9)
    _report_skipped(skipped[reported:])
    _say(
        f"job {job_id}: enqueued {enqueuer.images} images in {enqueuer.messages} messages "
        f"({enqueuer.images / elapsed:,.0f} paths/s)"
    )
    if wait:
        queue = settings.redis.queue
        status = _follow(client, job_id, queue, sys.stderr, sys.stderr.isatty(), defaults.STATUS_LINE_EVERY_S)
        _say(_summary(status))
        for line in _failure_lines(client, status):
            _say(line)
        sys.exit(1 if status.failed or status.cancelled else 0)


def _report_skipped(skipped: Sequence[str]) -> None:
    for line in skipped[:10]:
        _say(f"skipped unreadable {line}")
    if len(skipped) > 10:
        _say(f"... and {len(skipped) - 10} more unreadable folders")


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--job", "job_id", help="Job id to create.  [default: time-based]")
@click.option("--existing", is_flag=True, help="Also enqueue the images already in DIRECTORY.")
@setting_option(
    "WATCH_SETTLE_MS",
    "--settle-ms",
    type=click.IntRange(min=0),
    help="Quiet time (ms) before a file with neither a close-after-write nor a rename-in event counts as written",
)
@setting_option(
    "WATCH_RESCAN_S",
    "--rescan-s",
    type=click.IntRange(min=0),
    help="Seconds between rescans of DIRECTORY for new files that no event named (0: only after a reported loss)",
)
@redis_url_option
def watch(
    directory: Path,
    job_id: str | None,
    existing: bool,
    watch_settle_ms: int | None,
    watch_rescan_s: int | None,
    redis_url: str | None,
) -> None:
    """Streaming: enqueue each new image file under DIRECTORY once it is completely written, until stopped.

    Prints the job id; files that land together (within a few ms) go out as messages of up to
    IMGPIPE_CHUNK_SIZE paths, and workers batch across messages. Ctrl-C (or SIGTERM) stops it,
    saying how many images it sent.
    """
    from imgpipe.broker import redis_client
    from imgpipe.producer.enqueue import Enqueuer, producer_app
    from imgpipe.producer.watch import Watcher

    settings = _settings(redis_url=redis_url, watch_settle_ms=watch_settle_ms, watch_rescan_s=watch_rescan_s)
    if not directory.is_dir():
        raise ConfigError(f"not a directory: {directory}")
    root = str(directory.absolute())
    settle = settings.producer.watch_settle_ms / 1000
    client = redis_client(settings.redis)
    ttl = settings.redis.result_ttl_days * 86400
    job_id = create_job(client, job_id, kind="stream", roots=[root], ttl_seconds=ttl)
    watcher = Watcher(root, settle_s=settle, rescan_s=settings.producer.watch_rescan_s)
    watcher.start()  # watching before the job id is printed: a file that lands right after it is not missed
    click.echo(job_id)
    sys.stdout.flush()
    stop = threading.Event()
    app = producer_app(settings.redis)
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            chunk = settings.producer.chunk_size
            with Enqueuer(client, app, job_id, chunk_size=chunk, ttl_seconds=ttl) as enqueuer:
                # Files that land together (within WATCH_COALESCE_MS) go out in messages of up to `chunk` paths.
                watcher.on_batch = enqueuer.add
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


@honours("redis", exclude=("VISIBILITY_TIMEOUT", "RESULT_TTL_DAYS"))
@click.command()
@click.argument("job_id", metavar="[JOB]", required=False)
@click.option(
    "--watch",
    "live",
    is_flag=True,
    help="Keep refreshing until the job is done (all jobs: until Ctrl-C): a progress bar on a terminal, "
    "else one line every --every seconds.",
)
@click.option(
    "--every",
    type=click.FloatRange(min=0.1),
    default=defaults.STATUS_LINE_EVERY_S,
    show_default=True,
    help="--watch when stdout is not a terminal: seconds between lines.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job instead of text.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Jobs listed without JOB.")
@redis_url_option
def status(job_id: str | None, live: bool, every: float, as_json: bool, limit: int, redis_url: str | None) -> None:
    """Job progress: total, done, failed, rate, ETA, and whether any worker is taking the job's messages;
    every recent job when no JOB is given.

    The rate is measured between the job's first and latest record (with --watch: over the last minute
    watched); no rate is shown for a job done within a second. When no live worker serves the queue, or
    none has finished an image for a while, status says so instead of an ETA.
    """
    from imgpipe.broker import redis_client

    settings = _settings(redis_url=redis_url)
    client = redis_client(settings.redis)
    queue = settings.redis.queue
    if job_id is not None:
        job = job_status(client, job_id)
        if live and not job.finished:
            on_terminal = sys.stdout.isatty()
            job = _follow(client, job_id, queue, sys.stderr if on_terminal else sys.stdout, on_terminal, every)
        if as_json:
            click.echo(json.dumps(job.as_dict()))
        else:
            click.echo(_describe(job, live_workers(client), queue))
            for line in _failure_lines(client, job):
                click.echo(f"  {line}")
        return
    while True:
        jobs = job_statuses(client, limit=limit)
        if as_json:
            for job in jobs:
                click.echo(json.dumps(job.as_dict()))
        else:
            if live and sys.stdout.isatty():
                click.clear()
            elif live:
                click.echo(time.strftime("%Y-%m-%d %H:%M:%S"))
            click.echo(_table(jobs, live_workers(client), queue))
        if not live:
            return
        try:
            time.sleep(max(defaults.STATUS_REFRESH_S, 1.0) if sys.stdout.isatty() else every)
        except KeyboardInterrupt:
            return


def _confirm(question: str, yes: bool) -> None:
    """Ask on the terminal (stderr) unless --yes; a "no" leaves everything as it was (exit 1)."""
    if yes:
        return
    try:
        agreed = click.confirm(question, default=False, err=True)
    except click.Abort:
        click.echo(err=True)  # end the question's line
        raise ConfigError("no answer (stdin closed or interrupted); pass --yes to skip the question") from None
    if not agreed:
        _say("nothing changed")
        sys.exit(1)


@honours("redis", exclude=("QUEUE", "VISIBILITY_TIMEOUT", "RESULT_TTL_DAYS"))
@click.command()
@click.argument("job_id", metavar="JOB")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@redis_url_option
def cancel(job_id: str, yes: bool, redis_url: str | None) -> None:
    """Cancel JOB: workers skip and acknowledge its remaining messages, and its record says cancelled.

    The records written so far stay (`imgpipe results JOB`) until `imgpipe delete JOB` or their TTL
    (IMGPIPE_RESULT_TTL_DAYS). An `imgpipe enqueue --wait` following the job ends with exit 1.
    """
    from imgpipe.broker import redis_client

    client = redis_client(_settings(redis_url=redis_url).redis)
    job = job_status(client, job_id)
    if job.finished:
        _say(f"job {job_id} is already {job.state} ({_counts(job)}); nothing to cancel")
        return
    _confirm(f"Cancel job {job_id} ({_counts(job)}, {job.progress.backlog} images not done)?", yes)
    if cancel_job(client, job_id) == 2:
        _say(f"job {job_id} finished meanwhile; nothing to cancel")
        return
    job = job_status(client, job_id)
    _say(
        f"job {job_id} cancelled ({_counts(job)}): workers skip its remaining messages; "
        f"`imgpipe delete {job_id}` removes its records"
    )


@honours("redis", exclude=("QUEUE", "VISIBILITY_TIMEOUT", "RESULT_TTL_DAYS"))
@click.command()
@click.argument("job_id", metavar="JOB")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@redis_url_option
def delete(job_id: str, yes: bool, redis_url: str | None) -> None:
    """Delete JOB from Redis: its records, counters, pending messages and dead letters.

    A job still running loses the rest of its images: workers drop its queued messages (the job no longer
    exists). Export what you need first (`imgpipe results JOB -o FILE`).
    """
    from imgpipe.broker import redis_client

    client = redis_client(_settings(redis_url=redis_url).redis)
    job = job_status(client, job_id)
    running = "" if job.finished else "; it is still running: workers will drop its queued messages"
    _confirm(f"Delete job {job_id} and its {job.progress.completed} records{running}?", yes)
    delete_job(client, job_id)
    _say(f"job {job_id} deleted ({job.progress.completed} records)")


@honours("redis", exclude=("QUEUE", "VISIBILITY_TIMEOUT", "RESULT_TTL_DAYS"))
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

    chosen = format_for(output, fmt)
    client = redis_client(_settings(redis_url=redis_url).redis)
    job = job_status(client, job_id)
    with output_file(output) as stream:
        count = RecordWriter(stream, chosen).write_all(iter_records(client, job_id))
    if job.cancelled:
        _say(f"job {job_id} was cancelled: {count} of {job.total} images have records")
    elif not job.finished:
        _say(f"job {job_id} is not finished: {count} of {job.total} images have records so far")
    if output is not None:
        _say(f"wrote {count} records to {output}")


def _follow(client: redis.Redis, job_id: str, queue: str, out: IO[str], bar: bool, every: float) -> JobStatus:
    """Follow a job until it is finished and return its final status: a progress bar on ``out`` when ``bar``
    (a terminal), else one progress line on ``out`` every ``every`` seconds (logs, CI, pipes)."""
    window = RateWindow()
    job = job_status(client, job_id)
    progress = tqdm(total=job.total, unit="img", desc=job_id, file=out, dynamic_ncols=True, disable=not bar)
    last_line = -float("inf")
    with progress:
        while True:
            window.add(time.monotonic(), {job_id: job.progress.completed})
            rate = window.rate(job_id)
            note = _worker_note(job, live_workers(client), queue) if not job.finished else None
            if bar:
                progress.total = job.total
                progress.n = job.progress.completed
                progress.set_postfix_str(f"failed={job.failed}" + (f"; {note}" if note else ""), refresh=False)
                progress.refresh()
            elif job.finished or time.monotonic() - last_line >= every:
                print(_line(job, rate, note), file=out, flush=True)
                last_line = time.monotonic()
            if job.finished:
                return job
            time.sleep(defaults.STATUS_REFRESH_S)
            job = job_status(client, job_id)


def _worker_note(job: JobStatus, workers: Sequence[WorkerInfo], queue: str) -> str | None:
    """What stops an unfinished job from moving, if anything: no live worker on its queue, or none has
    finished an image for STALL_S seconds (by the worker registry's heartbeats)."""
    if job.finished:
        return None
    queue = pin_queue(job.pin, queue)
    serving = [w for w in workers if queue in w.queues]
    if not serving and job.pin:
        live = collections.Counter(w.model for w in workers)
        others = ", ".join(f"{model} x{count}" for model, count in sorted(live.items())) or "none"
        return f"waiting: no live worker serves {job.pin} (live: {others})"
    if not serving:
        return f"no live worker on queue {queue!r} (start one: imgpipe worker)"
    latest = max(max(w.progress or w.started for w in serving), job.updated or job.progress.created)
    idle = job.now - latest
    if job.progress.backlog and idle >= defaults.STALL_S:
        return f"no worker has taken a message for {idle:.0f} s ({len(serving)} live on {queue!r})"
    return None


def _line(job: JobStatus, rate: float | None, note: str | None) -> str:
    """One progress line for logs: time, job, state, counts, rate, ETA (or what stops the job)."""
    rate = job.rate if rate is None else rate
    text = f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {job.job_id} {job.state}: {_counts(job)}"
    if job.finished:
        return text + (f" in {_took(job.took)}" if job.took is not None else "")
    text += f", rate {_rate(rate)}"
    if note:
        return text + f"; {note}"
    eta = job.progress.backlog / rate if rate else None
    return text + f", eta {_duration(eta)}"


def _counts(job: JobStatus) -> str:
    return f"{job.done} ok, {job.failed} failed of {job.total}"


def _summary(job: JobStatus) -> str:
    took = f" in {_took(job.took)}" if job.took is not None else ""
    return f"job {job.job_id} {job.state}: {_counts(job)}{took}"


def _failure_lines(client: redis.Redis, job: JobStatus) -> list[str]:
    """``2 not_allowed: path is outside the allowed roots (IMGPIPE_ALLOWED_ROOTS)``: one line per reason."""
    if not job.failed:
        return []
    return [f"{count} {reason}: {example}" for reason, count, example in failure_reasons(client, job.job_id)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _took(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else _duration(seconds)


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.1f}/s"


def _describe(job: JobStatus, workers: Sequence[WorkerInfo], queue: str) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.progress.created))
    note = _worker_note(job, workers, queue)
    rows = [
        ("job", job.job_id),
        ("state", job.state),
        ("kind", job.kind),
        ("total", str(job.total)),
        ("done", str(job.done)),
        ("failed", str(job.failed)),
        ("rate", _rate(job.rate) + (" (first to latest record)" if job.rate is not None else "")),
        ("eta", "-" if note or job.finished else _duration(job.eta)),
        ("created", created),
    ]
    if job.took is not None:
        rows.append(("took", _took(job.took)))
    if job.pin:
        rows.append(("model", f"{job.pin} (pinned)"))
    if not job.finished:
        queue = pin_queue(job.pin, queue)
        serving = sum(queue in w.queues for w in workers)
        rows.append(("workers", note or f"{serving} live on queue {queue!r}"))
    return "\n".join(f"{name:<8} {value}" for name, value in rows)


def _table(jobs: list[JobStatus], workers: Sequence[WorkerInfo], queue: str) -> str:
    if not jobs:
        return "no jobs (imgpipe enqueue DIR creates one)"
    header = f"{'JOB':<26} {'STATE':<10} {'TOTAL':>9} {'DONE':>9} {'FAILED':>7} {'RATE':>11} {'ETA':>9}"
    lines = [header]
    notes = []
    for job in jobs:
        note = _worker_note(job, workers, queue)
        if note:
            notes.append(note)
        lines.append(
            f"{job.job_id:<26} {job.state:<10} {job.total:>9} {job.done:>9} {job.failed:>7} "
            f"{_rate(job.rate):>11} {'-' if note or job.finished else _duration(job.eta):>9}"
        )
    if notes:
        pinned = [n for n in notes if n.startswith("waiting: no live worker serves")]  # one per pinned model
        lines.extend(dict.fromkeys([notes[0], *pinned]))  # else the same for every waiting job
    elif any(not job.finished for job in jobs):
        lines.append(f"workers: {sum(queue in w.queues for w in workers)} live on queue {queue!r}")
    return "\n".join(lines)
