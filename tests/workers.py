"""Real `imgpipe worker` processes for tests: start, wait until ready, kill -9, and always stop them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from imgpipe import keys
from tests.conftest import REPO
from worker.bench import stop_process_group

READY = re.compile(r"imgpipe-\d+@\S+ ready\.")


class WorkerProcess:
    """One `imgpipe worker` command, in its own process group (so its children go with it), logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgpipe", "worker", *args],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, processes: int = 1, timeout: float = 90) -> WorkerProcess:
        """Until ``processes`` Celery workers of this command say they are ready."""
        deadline = time.monotonic() + timeout
        while len(READY.findall(self.log())) < processes:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def kill9(self) -> None:
        """kill -9 of the whole command (a machine crash, as far as Redis can tell)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM (Celery's warm shutdown), then SIGKILL if it does not end in time; returns the exit code."""
        code = stop_process_group(self.proc, timeout)
        self._log.close()
        return code


class Workers:
    """Starts workers for one test and stops every one of them at the end, whatever happened."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.started: list[WorkerProcess] = []

    def start(self, *args: str, ready: bool = True, processes: int = 1, **env: str) -> WorkerProcess:
        log_path = self.tmp_path / f"worker-{len(self.started)}.log"
        worker = WorkerProcess(list(args), {**self.env, **env}, log_path)
        self.started.append(worker)
        return worker.wait_ready(processes) if ready else worker

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name} ---\n{w.log()}" for w in self.started)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for worker in self.started:
            worker.stop()


def wait_for_job(client: redis.Redis, job_id: str, timeout: float, workers: Workers | None = None) -> dict[str, str]:
    """The job's hash once it is finished (sealed and every image recorded); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        job = {k.decode(): v.decode() for k, v in client.hgetall(keys.job(job_id)).items()}
        if job.get("finished"):
            return job
        if time.monotonic() > deadline:
            logs = workers.logs() if workers is not None else ""
            raise AssertionError(f"job {job_id} not finished after {timeout} s: {job}\n{logs}")
        time.sleep(0.05)


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
