"""The enqueue suite of `imgpipe bench`: imgpipe's producer against a plain send_task loop, and the folder scan.

No torch here: it runs on a producer host. It writes only to the scratch Redis it is given.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from celery import Celery

from imgpipe import keys
from imgpipe.bench.results import BenchError, SuiteResult, median_rate
from imgpipe.jobs import create_job, seal_job
from imgpipe.producer.enqueue import Enqueuer, producer_app
from imgpipe.scan import scan
from imgpipe.settings import RedisSettings

# Files per leaf folder of the generated tree the scan walks; ten leaf folders per top-level folder.
FILES_PER_DIR = 100
DIRS_PER_TOP = 10


def synthetic_paths(count: int) -> list[str]:
    """``count`` distinct absolute paths shaped like a photo archive's (nothing is read: no worker runs)."""
    return [f"/data/photos/{i // 10000:03d}/{i // 100 % 100:02d}/IMG_{i:07d}.jpg" for i in range(count)]


def naive_enqueue(client: redis.Redis, app: Celery, job_id: str, paths: list[str], chunk_size: int) -> int:
    """What a user would write first: per chunk, one HINCRBY of the total, then a plain ``send_task``
    (Celery's default argsrepr, the repr of every path). Returns the number of paths sent."""
    for start in range(0, len(paths), chunk_size):
        chunk = paths[start : start + chunk_size]
        client.hincrby(keys.job(job_id), "total", len(chunk))
        app.send_task(keys.TASK_CLASSIFY, args=[job_id, chunk])
    return len(paths)


def make_tree(root: Path, files: int) -> int:
    """Empty ``.jpg`` files in nested folders (``root/tNNN/dNN/IMG_*.jpg``); returns how many folders."""
    folders = 0
    for index in range(files):
        leaf, _ = divmod(index, FILES_PER_DIR)
        folder = root / f"t{leaf // DIRS_PER_TOP:03d}" / f"d{leaf % DIRS_PER_TOP:02d}"
        if index % FILES_PER_DIR == 0:
            folder.mkdir(parents=True)
            folders += 1
        (folder / f"IMG_{index:07d}.jpg").touch()
    return folders


def run_enqueue_bench(redis_url: str, *, paths: int, chunk_size: int, scan_files: int, repeat: int) -> SuiteResult:
    """Paths/s of imgpipe's Enqueuer and of the naive loop (same paths, chunk size and Redis), and of the scan.

    ``redis_url`` must be a scratch server: its database 0 is flushed before every measurement.
    """
    settings = RedisSettings(url=redis_url + "/0")
    client = redis.Redis.from_url(settings.url)
    ttl = settings.result_ttl_days * 86400
    path_list = synthetic_paths(paths)
    naive_app, imgpipe_app = producer_app(settings), producer_app(settings)  # one each, warmed up below

    def measure(send: Callable[[str, list[str]], int], sample: list[str]) -> float:
        client.flushdb()
        job_id = create_job(client, None, kind="batch", roots=["/data/photos"], ttl_seconds=ttl)
        start = time.perf_counter()
        sent = send(job_id, sample)
        seal_job(client, job_id)
        elapsed = time.perf_counter() - start
        total = int(client.hget(keys.job(job_id), "total") or 0)
        queued = int(client.llen(settings.queue))
        expected = -(-len(sample) // chunk_size)
        if sent != len(sample) or total != len(sample) or queued != expected:
            raise BenchError(
                f"enqueue bench: sent {sent}, total {total}, {queued} messages queued; "
                f"expected {len(sample)} paths in {expected} messages"
            )
        return len(sample) / elapsed

    def naive(job_id: str, sample: list[str]) -> int:
        return naive_enqueue(client, naive_app, job_id, sample, chunk_size)

    def imgpipe(job_id: str, sample: list[str]) -> int:  # what `imgpipe enqueue` does once it has scanned
        with Enqueuer(client, imgpipe_app, job_id, chunk_size=chunk_size, ttl_seconds=ttl) as enqueuer:
            return enqueuer.add(sample)

    try:
        server = client.info("server")
        warmup = path_list[: chunk_size * 4]
        measure(naive, warmup)  # connections, Celery's app finalisation, kombu's queue declaration
        measure(imgpipe, warmup)
        naive_rates, imgpipe_rates = [], []
        for _ in range(repeat):  # interleaved, so that drift on the machine touches both alike
            naive_rates.append(measure(naive, path_list))
            imgpipe_rates.append(measure(imgpipe, path_list))
        client.flushdb()
    finally:
        client.close()

    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-scan-") as tmp:
        root = Path(tmp)
        folders = make_tree(root, scan_files)

        def walk() -> int:
            return sum(1 for _ in scan(root))

        if walk() != scan_files:
            raise BenchError(f"scan bench: scan found {walk()} of {scan_files} files")
        scan_rate = median_rate(walk, repeat)

    messages = -(-paths // chunk_size)
    result = SuiteResult(
        "enqueue",
        "paths/s",
        f"enqueue: {paths} synthetic paths in {messages} messages of {chunk_size}, to a scratch redis-server "
        f"{server.get('redis_version', '?')} on 127.0.0.1, no worker; scan: {scan_files} empty files in "
        f"{folders} folders; median of {repeat}",
        info={"paths": paths, "chunk_size": chunk_size, "messages": messages, "scan_files": scan_files},
    )
    result.add(
        "baseline_send_task",
        statistics.median(naive_rates),
        "baseline_send_task",
        "per chunk: HINCRBY, then app.send_task with default argsrepr",
    )
    result.add(
        "imgpipe_enqueuer",
        statistics.median(imgpipe_rates),
        "baseline_send_task",
        "producer.enqueue: total, pending records and messages (built directly, LPUSH) in one pipeline per group",
    )
    result.add("scan", scan_rate, None, "producer.scan over the tree (streaming os.scandir), no baseline")
    return result
