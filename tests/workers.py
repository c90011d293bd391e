"""Real `imgpipe worker` processes for tests (the harness in imgpipe.procs), always stopped, and job waits."""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from imgpipe import keys
from imgpipe.procs import WorkerProcess, wait_until
from tests.conftest import REPO, cli_env, run_cli


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


class OpenWatch:
    """inotify IN_OPEN on folders (libc through ctypes): proves that no file in them is ever opened."""

    IN_OPEN = 0x20
    IN_NONBLOCK = 0o4000

    def __init__(self, folders: list[Path]) -> None:
        import ctypes
        import ctypes.util

        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for folder in folders:
            if self._libc.inotify_add_watch(self.fd, bytes(folder), self.IN_OPEN) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        self.opens = 0

    def poll(self) -> int:
        """Opens seen so far (reads the pending events)."""
        import os

        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.opens
            offset = 0
            while offset < len(data):  # struct inotify_event: wd, mask, cookie, len, name[len]
                mask = int.from_bytes(data[offset + 4 : offset + 8], "little")
                length = int.from_bytes(data[offset + 12 : offset + 16], "little")
                if mask & self.IN_OPEN:
                    self.opens += 1
                offset += 16 + length

    def wait_open(self, timeout: float) -> bool:
        """Block until an open event arrives (True) or ``timeout`` passes (False)."""
        import select

        before = self.opens
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return bool(ready) and self.poll() > before

    def close(self) -> None:
        import os

        os.close(self.fd)


def send_raw(redis_url: str, args: Any, message_id: str, headers: dict[str, Any] | None = None) -> None:
    """Publish an ``imgpipe.classify_chunk`` message exactly as given (JSON), as any other client could."""
    from kombu import Connection

    with Connection(redis_url) as conn:
        conn.Producer().publish(
            [args, {}, {"callbacks": None, "errbacks": None, "chain": None}],
            routing_key="imgpipe",
            exchange="",
            serializer="json",
            headers={
                "lang": "py",
                "task": keys.TASK_CLASSIFY,
                "id": message_id,
                "root_id": message_id,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "eta": None,
                "expires": None,
                **(headers or {}),
            },
        )


def assert_exactly_once(
    client: redis.Redis, job_id: str, inputs: set[str], queue: str = "imgpipe"
) -> dict[str, dict[str, Any]]:
    """The promise: one record per input and nothing else, counters that add up, no leftovers in the job's
    ``queue`` (a pinned job's: its model's) or unacknowledged."""
    import json

    from imgpipe.jobs import iter_records

    records = list(iter_records(client, job_id))
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)), "a path has two records"
    assert set(paths) == inputs
    job = {k.decode(): v.decode() for k, v in client.hgetall(keys.job(job_id)).items()}
    assert int(job["done"]) + int(job["failed"]) == int(job["total"]) == len(inputs)
    assert not [e for e in (json.loads(x) for x in client.lrange(keys.DEAD_LETTER, 0, -1)) if e["job"] == job_id]
    try:
        wait_until(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, 30, "queue and unacked empty")
    except Exception as exc:
        left = [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)]
        unacked = [json.loads(m)[0]["headers"]["id"] for m in client.hvals("unacked")]
        raise AssertionError(
            f"{exc}: queued {left[:5]} ({len(left)}), unacked {unacked[:5]} ({len(unacked)})"
        ) from None
    return {r["path"]: r for r in records}


class AofRedis:
    """A redis-server with AOF `always` on a fixed port and folder, that a test can kill -9 and start again."""

    def __init__(self, folder: Path) -> None:
        from imgpipe.scratch_redis import find_redis_server, free_port

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.binary = find_redis_server() or "redis-server"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Any = None

    def start(self) -> None:
        import subprocess

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"]
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping()) and client.info("persistence").get("loading") == 0
            except redis.RedisError:
                return False

        wait_until(up, 30, f"redis-server on port {self.port}")
        client.close()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> AofRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def workers_for(tmp_path: Path, redis_url: str, roots: Path, **env: str) -> Workers:
    """Workers on ``redis_url`` allowed to read beneath ``roots``, with ``env`` on top."""
    return Workers(tmp_path, cli_env(IMGPIPE_REDIS_URL=redis_url, IMGPIPE_ALLOWED_ROOTS=str(roots), **env))


def enqueue_cli(redis_url: str, *args: str) -> str:
    """`imgpipe enqueue ARGS` on ``redis_url``; the job id it prints."""
    result = run_cli("enqueue", *args, env=cli_env(IMGPIPE_REDIS_URL=redis_url), timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class SilentProxy:
    """A TCP proxy on loopback in front of a Redis that can make every connection it carries go silent at once
    (``silence``): their bytes are read and dropped both ways and nothing is closed, as after a NAT or firewall
    timeout or a failover, where the peer is gone and no RST ever comes. Connections opened after that are
    carried normally."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._live: list[list[Any]] = []  # [client socket, upstream socket, silent flag holder]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def silence(self) -> int:
        """Every connection carried now goes silent for good; returns how many."""
        with self._lock:
            for pair in self._live:
                pair[2] = True
            return len(self._live)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            pair: list[Any] = [client, upstream, False]
            with self._lock:
                self._live.append(pair)
            threading.Thread(target=self._pump, args=(pair, 0, 1), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, 1, 0), daemon=True).start()

    def _pump(self, pair: list[Any], src: int, dst: int) -> None:
        while True:
            try:
                data = pair[src].recv(65536)
            except OSError:
                return
            if not data:
                if not pair[2]:
                    with contextlib.suppress(OSError):
                        pair[dst].shutdown(socket.SHUT_WR)  # pass the close on
                return
            if pair[2]:  # silent: dropped
                continue
            try:
                pair[dst].sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for pair in self._live:
                for sock in pair[:2]:
                    with contextlib.suppress(OSError):
                        sock.close()
