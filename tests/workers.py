"""Real `imgpipe worker` processes for tests (the harness in imgpipe.procs), always stopped, and job waits."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from imgpipe import keys
from imgpipe.procs import WorkerProcess, wait_until
from tests.conftest import REPO


class Workers:
    """Starts workers for one test and stops every one of them at the end, whatever happened."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.started: list[WorkerProcess] = []

    def start(self, *args: str, ready: bool = True, processes: int = 1, **env: str) -> WorkerProcess:
        log_path = self.tmp_path / f"worker-{len(self.started)}.log"
        worker = WorkerProcess(list(args), {**self.env, **env}, log_path, cwd=REPO)
        self.started.append(worker)
        if ready:
            worker.wait_ready(processes, timeout=90)
        return worker

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name} ---\n{w.log()}" for w in self.started)

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for worker in self.started:
            worker.stop()


def wait_for_job(client: redis.Redis, job_id: str, timeout: float, workers: Workers | None = None) -> dict[str, str]:
    """The job's hash once it is finished (sealed and every image recorded); AssertionError on timeout."""

    def finished() -> dict[str, str] | None:
        job = {k.decode(): v.decode() for k, v in client.hgetall(keys.job(job_id)).items()}
        return job if job.get("finished") else None

    try:
        return wait_until(finished, timeout, f"job {job_id} finished")
    except Exception as exc:
        logs = workers.logs() if workers is not None else ""
        job = client.hgetall(keys.job(job_id))
        raise AssertionError(f"{exc}: {job}\n{logs}") from None


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def histogram(text: str, name: str) -> dict[str, Any]:
    """Buckets (upper bound -> cumulative count), count and sum of an unlabelled histogram in /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    result: dict[str, Any] = {"buckets": {}}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                result["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name == f"{name}_count":
                result["count"] = sample.value
            elif sample.name == f"{name}_sum":
                result["sum"] = sample.value
    return result
