"""The pipeline suite of `imgpipe bench`: a real `imgpipe worker` fed one-image messages, with and without
cross-message batching (IMGPIPE_MAX_BATCH=N against IMGPIPE_MAX_BATCH=1)."""

from __future__ import annotations

import os
import shutil
import statistics
import time
import urllib.request
from pathlib import Path

import redis
from celery import Celery

from imgpipe.bench.results import BenchError, SuiteResult
from imgpipe.jobs import JobStatus, create_job, iter_records, job_status, seal_job
from imgpipe.procs import ProcessError, WorkerProcess, wait_until
from imgpipe.producer.enqueue import Enqueuer, producer_app
from imgpipe.settings import ENV_PREFIX, BatchSettings, RedisSettings, Settings
from imgpipe.worker.app import prefetch

# Images per measured job recorded by a worker no slower than this (images/s) before the bench gives up.
SLOWEST_RATE = 2.0
POLL_S = 0.02


def link_images(sources: list[Path], out: Path, count: int) -> list[str]:
    """``count`` distinct paths in ``out`` (hard links, or copies across devices), cycling over ``sources``:
    a job records each path once, so the same file may serve several paths but never under one name."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        target = out / f"{index:06d}{source.suffix.lower()}"
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        paths.append(str(target))
    return paths


def batch_size_totals(port: int | None) -> tuple[float, float]:
    """(sum, count) of the worker's imgpipe_batch_size histogram; (0, 0) when it serves no metrics."""
    if port is None:
        return 0.0, 0.0
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"imgpipe_batch_size_sum": 0.0, "imgpipe_batch_size_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["imgpipe_batch_size_sum"], totals["imgpipe_batch_size_count"]


def _finished(status: JobStatus) -> JobStatus | None:
    return status if status.finished else None


def run_job(
    client: redis.Redis, app: Celery, settings: RedisSettings, paths: list[str], worker: WorkerProcess
) -> float:
    """Enqueue ``paths`` one per message (as `imgpipe watch` does), seal, and wait for the job to finish;
    returns images/s from just before the first message is sent to the job's finish time (Redis clock)."""
    ttl = settings.result_ttl_days * 86400
    job_id = create_job(client, None, kind="stream", roots=[str(Path(paths[0]).parent)], ttl_seconds=ttl)
    start = time.time()
    with Enqueuer(client, app, job_id, chunk_size=1, ttl_seconds=ttl) as enqueuer:
        enqueuer.add(paths)
    seal_job(client, job_id)
    try:
        status = wait_until(
            lambda: _finished(job_status(client, job_id)),
            30 + len(paths) / SLOWEST_RATE,
            f"job {job_id} finished",
            interval=POLL_S,
            check=worker.check_alive,
        )
    except ProcessError as exc:
        raise BenchError(f"{exc}\n{worker.log(3000)}") from None
    if status.done != len(paths):
        errors = [r.get("error") for r in iter_records(client, job_id) if r.get("status") != "ok"][:3]
        raise BenchError(f"job {job_id}: {status.done} of {len(paths)} images classified; errors: {errors}")
    finished = status.progress.finished
    assert finished is not None  # a finished job has its time
    return len(paths) / max(finished - start, 1e-9)


def run_pipeline_bench(
    redis_url: str,
    sources: list[Path],
    workdir: Path,
    *,
    images: int,
    max_batch: int,
    max_wait_ms: int,
    decode_threads: int,
    device: str,
    model: Path,
    repeat: int,
) -> SuiteResult:
    """Images/s of one `imgpipe worker` process with IMGPIPE_MAX_BATCH=1 and =``max_batch``, each fed
    ``images`` one-image messages per job; the median of ``repeat`` jobs after a warm-up job.

    ``redis_url`` must be a scratch server: its database 0 is flushed before each variant.
    """
    if not sources:
        raise BenchError("no images to feed the worker")
    data = workdir / "images"
    paths = link_images(sources, data, images)
    settings = RedisSettings(url=redis_url + "/0")
    client = redis.Redis.from_url(settings.url)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "PROMETHEUS_MULTIPROC_DIR"}
    rates: dict[int, float] = {}
    mean_batch: dict[int, float] = {}
    try:
        for batch in dict.fromkeys((1, max_batch)):
            client.flushdb()
            env = {
                **base_env,
                "PYTHONUNBUFFERED": "1",
                f"{ENV_PREFIX}REDIS_URL": settings.url,
                f"{ENV_PREFIX}ALLOWED_ROOTS": str(data),
                f"{ENV_PREFIX}MAX_BATCH": str(batch),
                f"{ENV_PREFIX}MAX_WAIT_MS": str(max_wait_ms),
                f"{ENV_PREFIX}DECODE_THREADS": str(decode_threads),
                f"{ENV_PREFIX}DEVICE": device,
                f"{ENV_PREFIX}CONCURRENCY": "1",
                f"{ENV_PREFIX}MODEL": str(model),
                f"{ENV_PREFIX}METRICS_PORT": "0",
                f"{ENV_PREFIX}METRICS_BIND": "127.0.0.1",
            }
            with WorkerProcess(["--loglevel", "info"], env, workdir / f"worker-max-batch-{batch}.log") as worker:
                port = worker.wait_ready()
                app = producer_app(settings)
                run_job(client, app, settings, paths[: min(len(paths), 2 * max_batch)], worker)  # warm-up
                before = batch_size_totals(port)
                rates[batch] = statistics.median(run_job(client, app, settings, paths, worker) for _ in range(repeat))
                after = batch_size_totals(port)
            if after[1] > before[1]:
                mean_batch[batch] = (after[0] - before[0]) / (after[1] - before[1])
        client.flushdb()
    finally:
        client.close()

    result = SuiteResult(
        "pipeline",
        "images/s",
        f"pipeline: {images} images, one per message, sent at once to one `imgpipe worker` process on {device} "
        f"({decode_threads} decode threads, IMGPIPE_MAX_WAIT_MS={max_wait_ms}); first send to job finished; "
        f"worker start and a warm-up job not counted; median of {repeat}",
        info={"images": images, "mean_batch": {f"max_batch{b}": round(m, 1) for b, m in mean_batch.items()}},
    )
    for batch, rate in rates.items():
        kind = "no cross-message batching" if batch == 1 else "images of many messages in one batch"
        held = prefetch(Settings(batch=BatchSettings(max_batch=batch)))
        mean = f", mean batch {mean_batch[batch]:.1f}" if batch in mean_batch else ""
        result.add(
            f"worker_max_batch{batch}",
            rate,
            "worker_max_batch1",
            f"IMGPIPE_MAX_BATCH={batch}: {kind} ({held} messages held){mean}",
        )
    return result
