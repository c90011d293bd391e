"""The queue variants of `imgpipe bench`: real `imgpipe worker` processes on a scratch Redis, fed the way users
feed them: `enqueue` chunks (``pipeline``), one path per message as a third-party producer sends them
(``stream``), one Celery task per image with batching off (``naive``), and files landing in a folder that
`imgpipe watch` streams (``watch``)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from imgpipe import keys
from imgpipe.bench.results import BenchError, HistogramCounts
from imgpipe.jobs import JobStatus, create_job, iter_records, job_status, seal_job
from imgpipe.procs import ProcessError, WorkerProcess, imgpipe_argv, stat_fields, stop_process_group, wait_until
from imgpipe.producer.enqueue import Enqueuer, producer_app
from imgpipe.scan import scan
from imgpipe.settings import ENV_PREFIX, RedisSettings

# Slowest rate (images/s) the bench waits for before it gives up on a job.
SLOWEST_RATE = 2.0
# How often the bench reads a job's status while it waits. The rates come from the job's own times, which the
# workers write (`finished`, `updated`), so polling sooner measures nothing better; each poll costs about 0.4 ms
# of CPU (bench and Redis, measured), taken from the workers being measured: at 100 polls/s that was 4% of a core.
POLL_S = 0.1


def _families(port: int | None) -> Iterator[Any]:
    """The metric families a worker's /metrics serves now (one scrape); none when it serves no metrics."""
    if port is None:
        return
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    yield from text_string_to_metric_families(text)


def histogram_counts(port: int | None, names: Sequence[str]) -> dict[str, HistogramCounts]:
    """Histograms ``names`` (e.g. imgpipe_batch_size) as a worker's /metrics serves them now, from one scrape;
    empty when the worker serves no metrics."""
    found: dict[str, tuple[dict[float, float], list[float]]] = {name: ({}, [0.0, 0.0]) for name in names}
    for family in _families(port):
        if family.name in found:
            buckets, totals = found[family.name]
            for sample in family.samples:
                if sample.name == f"{family.name}_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
                elif sample.name == f"{family.name}_sum":
                    totals[0] += sample.value
                elif sample.name == f"{family.name}_count":
                    totals[1] += sample.value
    return {name: HistogramCounts(buckets, totals[0], totals[1]) for name, (buckets, totals) in found.items()}


STAGE_METRIC = "imgpipe_stage_seconds"


def stage_totals(port: int | None) -> dict[str, tuple[float, float]]:
    """{stage: (seconds, observations)} of a worker's imgpipe_stage_seconds histogram (decode: per image, infer:
    per batch, write: per write), as its /metrics serves them now; empty when it serves no metrics."""
    totals: dict[str, tuple[float, float]] = {}
    for family in _families(port):
        if family.name != STAGE_METRIC:
            continue
        for sample in family.samples:
            stage = sample.labels.get("stage", "")
            seconds, count = totals.get(stage, (0.0, 0.0))
            if sample.name == f"{STAGE_METRIC}_sum":
                totals[stage] = (seconds + sample.value, count)
            elif sample.name == f"{STAGE_METRIC}_count":
                totals[stage] = (seconds, count + sample.value)
    return totals


def batch_size_totals(port: int | None) -> tuple[float, float]:
    """(sum, count) of a worker's imgpipe_batch_size histogram; (0, 0) when it serves no metrics."""
    counts = histogram_counts(port, ["imgpipe_batch_size"])["imgpipe_batch_size"]
    return counts.sum, counts.count


def _group_members(pgid: int) -> list[tuple[Path, list[str]]] | None:
    """(/proc/PID, the fields of its stat) of each live process in process group ``pgid``, from /proc (Linux);
    None where there is no /proc. A worker command runs in its own group (imgpipe.procs.WorkerProcess)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = []
    for entry in proc.iterdir():
        fields = stat_fields(entry.name) if entry.name.isdigit() else None  # None: gone meanwhile
        if fields is not None and int(fields[2]) == pgid:  # state, ppid, pgrp, ..., utime (11), stime (12)
            members.append((entry, fields))
    return members


def group_cpu_seconds(pgid: int) -> float | None:
    """CPU seconds (user + system) of the live processes in process group ``pgid``; None without /proc."""
    members = _group_members(pgid)
    if members is None:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(((int(fields[11]) + int(fields[12])) / ticks for _, fields in members), 0.0)


def group_rss_bytes(pgid: int) -> list[int] | None:
    """Resident memory of each live process in process group ``pgid`` (the worker command's supervisor and its
    worker processes); None without /proc."""
    members = _group_members(pgid)
    if members is None:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    sizes = []
    for entry, _ in members:
        try:
            sizes.append(int((entry / "statm").read_text().split()[1]) * page)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return sizes


def images_classified(port: int | None) -> float:
    """Images a worker has classified so far (``imgpipe_images_total``, every outcome), from one scrape."""
    return sum(
        sample.value
        for family in _families(port)
        if family.name == "imgpipe_images"
        for sample in family.samples
        if sample.name == "imgpipe_images_total"
    )


def _finished(status: JobStatus) -> JobStatus | None:
    return status if status.finished else None


class Workers:
    """``count`` warm `imgpipe worker` commands on database ``db`` of a scratch Redis, each running
    IMGPIPE_CONCURRENCY processes (``env``; default 1), with ``env`` on top of a clean environment (no IMGPIPE_*
    of the caller's)."""

    def __init__(
        self, redis_url: str, db: int, workdir: Path, *, count: int, model: Path, roots: Path, env: dict[str, str]
    ) -> None:
        self.settings = RedisSettings(url=f"{redis_url}/{db}")
        self.client = redis.Redis.from_url(self.settings.url)
        self.client.flushdb()
        base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env = {
            **base,
            "PYTHONUNBUFFERED": "1",
            f"{ENV_PREFIX}REDIS_URL": self.settings.url,
            f"{ENV_PREFIX}ALLOWED_ROOTS": str(roots),
            f"{ENV_PREFIX}CONCURRENCY": "1",  # unless env says
            f"{ENV_PREFIX}MODEL": str(model),
            f"{ENV_PREFIX}METRICS_PORT": "0",
            f"{ENV_PREFIX}METRICS_BIND": "127.0.0.1",
            **env,
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs = [
            WorkerProcess(["--loglevel", "info"], self.env, workdir / f"worker-db{db}-{i}.log") for i in range(count)
        ]
        self.ports: list[int | None] = []
        self.app = producer_app(self.settings)

    def __enter__(self) -> Workers:
        return self

    def wait_ready(self) -> None:
        try:
            processes = int(self.env[f"{ENV_PREFIX}CONCURRENCY"])
            self.ports = [proc.wait_ready(processes) for proc in self.procs]
        except ProcessError as exc:
            raise BenchError(str(exc)) from None

    def check_alive(self) -> None:
        for proc in self.procs:
            proc.check_alive()

    def mean_batch(self) -> tuple[float, float]:
        totals = [batch_size_totals(port) for port in self.ports]
        return sum(t[0] for t in totals), sum(t[1] for t in totals)

    def stage_totals(self) -> dict[str, tuple[float, float]]:
        """{stage: (seconds, observations)} of the stage histograms, summed over the workers (one scrape each)."""
        summed: dict[str, tuple[float, float]] = {}
        for port in self.ports:
            for stage, (seconds, count) in stage_totals(port).items():
                had = summed.get(stage, (0.0, 0.0))
                summed[stage] = (had[0] + seconds, had[1] + count)
        return summed

    def cpu_seconds(self) -> dict[str, float | None]:
        """CPU seconds used so far by the worker commands (every process of each; None without /proc) and by
        the scratch Redis (its INFO: the bench's own server, which serves nothing else)."""
        info = self.client.info("cpu")
        workers = [group_cpu_seconds(proc.pid) for proc in self.procs]
        return {
            "workers": None if None in workers else sum(w for w in workers if w is not None),
            "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        }

    def rss_mb(self) -> tuple[float, float] | None:
        """Resident memory now, in MB: (the largest process of the worker commands, all of them together); None
        without /proc."""
        sizes: list[int] = []
        for proc in self.procs:
            each = group_rss_bytes(proc.pid)
            if each is None:
                return None
            sizes += each
        return round(max(sizes, default=0) / 2**20, 1), round(sum(sizes) / 2**20, 1)

    def images_classified(self) -> int:
        """Images the workers have classified so far, every outcome (one scrape of each /metrics)."""
        return int(sum(images_classified(port) for port in self.ports))

    def histograms(self, names: Sequence[str]) -> dict[str, HistogramCounts]:
        """Histograms ``names`` summed over the workers, as their /metrics serve them now (one scrape each)."""
        scrapes = [histogram_counts(port, names) for port in self.ports]
        return {name: sum((scrape[name] for scrape in scrapes), HistogramCounts({})) for name in names}

    def wait_job(self, job_id: str, count: int) -> JobStatus:
        try:
            status = wait_until(
                lambda: _finished(job_status(self.client, job_id)),
                60 + count / SLOWEST_RATE,
                f"job {job_id} finished",
                interval=POLL_S,
                check=self.check_alive,
            )
        except ProcessError as exc:
            raise BenchError(f"{exc}\n{self.procs[0].log(3000)}") from None
        if status.done != count:
            errors = [r.get("error") for r in iter_records(self.client, job_id) if r.get("status") != "ok"][:3]
            raise BenchError(f"job {job_id}: {status.done} of {count} images classified; errors: {errors}")
        return status

    def run_job(self, folder: Path, chunk_size: int) -> float:
        """Scan ``folder`` and enqueue it in messages of ``chunk_size`` paths, as `imgpipe enqueue --wait` does;
        images/s from before the scan to the job's finish (its last record)."""
        ttl = self.settings.result_ttl_days * 86400
        start = time.time()
        job_id = create_job(self.client, None, kind="batch", roots=[str(folder)], ttl_seconds=ttl)
        with Enqueuer(self.client, self.app, job_id, chunk_size=chunk_size, ttl_seconds=ttl) as enqueuer:
            count = enqueuer.add(scan(folder))
        seal_job(self.client, job_id)
        status = self.wait_job(job_id, count)
        finished = status.progress.finished
        assert finished is not None  # a finished job has its time
        self._drop(job_id)
        return count / max(finished - start, 1e-9)

    def run_paced(self, folder: Path, rate: float) -> float:
        """Send the images of ``folder`` one path per message at a steady ``rate`` (messages/s), as cameras or
        an upload service produce them, each sent when its time comes (those due together go in one round
        trip); images/s from the first send to the job's last record."""
        if rate <= 0:
            raise ValueError(f"arrival rate must be > 0, got {rate}")
        paths = list(scan(folder))
        ttl = self.settings.result_ttl_days * 86400
        job_id = create_job(self.client, None, kind="batch", roots=[str(folder)], ttl_seconds=ttl)
        start = time.time()
        begin = time.perf_counter()
        with Enqueuer(self.client, self.app, job_id, chunk_size=1, ttl_seconds=ttl) as enqueuer:
            sent = 0
            while sent < len(paths):
                due = min(len(paths), int((time.perf_counter() - begin) * rate) + 1)
                if due > sent:
                    enqueuer.add(paths[sent:due])
                    sent = due
                else:  # until the next one is due
                    time.sleep(max(0.0, begin + sent / rate - time.perf_counter()))
        seal_job(self.client, job_id)
        status = self.wait_job(job_id, len(paths))
        finished = status.progress.finished
        assert finished is not None  # a finished job has its time
        self._drop(job_id)
        return len(paths) / max(finished - start, 1e-9)

    def run_watch(self, sources: Path, watched: Path) -> float:
        """Start `imgpipe watch` on an empty ``watched`` folder, then move the files of ``sources`` in, as a
        camera or an upload service lands them; images/s from the first file landing to the last record."""
        names = sorted(os.listdir(sources))
        watched.mkdir(parents=True, exist_ok=False)
        log = open(watched.parent / f"{watched.name}.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            imgpipe_argv("watch", str(watched)), env=self.env, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            job_id = proc.stdout.readline().decode().strip()
            if not job_id:
                raise BenchError(
                    f"imgpipe watch printed no job id: {(watched.parent / (watched.name + '.log')).read_text()}"
                )
            wait_until(
                lambda: b"watching" in (watched.parent / f"{watched.name}.log").read_bytes(), 60, "imgpipe watch ready"
            )
            start = time.time()
            for name in names:
                os.rename(sources / name, watched / name)
            self.wait_job_total(job_id, len(names))
            status = self.wait_job(job_id, len(names))
            last = status.updated
            assert last is not None
        finally:
            stop_process_group(proc)
            log.close()
        for name in names:  # put the files back for the next round
            os.rename(watched / name, sources / name)
        watched.rmdir()
        self._drop(job_id)
        return len(names) / max(last - start, 1e-9)

    def wait_job_total(self, job_id: str, count: int) -> None:
        """Until the watcher has sent ``count`` images; then seal, as stopping `imgpipe watch` would."""
        wait_until(
            lambda: int(self.client.hget(keys.job(job_id), "total") or 0) >= count,
            60 + count / SLOWEST_RATE,
            f"imgpipe watch sent {count} images",
            interval=POLL_S,
        )
        seal_job(self.client, job_id)

    def _drop(self, job_id: str) -> None:
        self.client.delete(keys.job(job_id), keys.job_results(job_id))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in self.procs:
            proc.stop()
        self.client.flushdb()
        self.client.close()
