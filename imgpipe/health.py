"""Worker health for probes: is this host's `imgpipe worker` alive (liveness), and is it consuming (readiness)?

How "this worker" is found: every worker process keeps a sentinel file ``worker-<pid>.json`` fresh in the
health directory (``IMGPIPE_HEALTH_DIR``, default ``<temp dir>/imgpipe-health-<uid>``), rewritten by a thread of
its own every 2 s whether Redis answers or not (so a Redis that hangs does not make the worker look dead), and
removed at a clean exit. ``imgpipe worker --check`` reads every sentinel of that directory whose process still
runs: in a container (one worker command per container, the supervisor's children included) that is exactly the
worker the probe asks about. On a bare host running several worker commands, give each its own
``IMGPIPE_HEALTH_DIR``.

- Liveness (``--check --liveness``): at least one worker process, each sentinel fresh (written within the
  heartbeat TTL: a stopped or wedged process writes none) and no process holding images it has not resolved for
  ``HEALTH_STALL_S`` (a hung batcher). Redis is not asked, so a Redis outage does not restart every pod.
- Readiness (``--check``): liveness, plus Redis answers, each process's heartbeat is in the registry (it reaches
  Redis, the way arq's health check reads a key its worker keeps fresh) and its Celery consumer holds a broker
  connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

from imgpipe import defaults, keys
from imgpipe.broker import safe_url
from imgpipe.registry import WorkerInfo
from imgpipe.settings import Settings

log = logging.getLogger(__name__)

SENTINEL_GLOB = "worker-*.json"
# Seconds the check waits for Redis (a probe has its own timeout, typically 5 s).
_REDIS_TIMEOUT_S = 3.0


def health_dir(settings: Settings) -> Path:
    """The folder of this host's (or container's) worker sentinels."""
    if settings.worker.health_dir is not None:
        return settings.worker.health_dir
    return Path(tempfile.gettempdir()) / f"{defaults.HEALTH_DIR_NAME}-{os.getuid()}"


def process_start(pid: int) -> str | None:
    """An identity of process ``pid`` that a reused pid does not share (its start time in clock ticks on Linux);
    None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (not Linux): fall back to "a process with this pid exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def consumer_connected(celery_worker: Any) -> bool:
    """Whether a Celery WorkController's consumer holds a broker connection (False before it first connects and
    while it retries after losing Redis). Read by attribute only: the core does not import Celery."""
    connection = getattr(getattr(celery_worker, "consumer", None), "connection", None)
    return bool(connection is not None and connection.connected)


class HealthReporter:
    """The worker's side: a thread that rewrites this process's sentinel file every ``interval`` seconds, and the
    heartbeat's status (the batcher's, plus ``work_since`` and ``connected``).

    The sentinel has its own thread rather than riding on the Redis heartbeat: a Redis that hangs (no answer,
    no refusal) may block a heartbeat write, and that must not make the process look dead.
    """

    def __init__(
        self,
        directory: Path,
        info: WorkerInfo,
        status: Callable[[], dict[str, Any]],
        interval: float = defaults.HEARTBEAT_INTERVAL_S,
    ) -> None:
        self.directory = directory
        self.path = directory / f"worker-{info.pid}.json"
        self.info = info
        self.interval = interval
        self._status = status
        self._start = process_start(info.pid)
        self._work_since = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgpipe-health", daemon=True)
        # Set once the Celery consumer exists; until then the worker is not consuming.
        self.connected: Callable[[], bool] = lambda: False

    def status(self) -> dict[str, Any]:
        """The changing fields of this worker's record (for the heartbeat and the sentinel)."""
        with self._lock:
            status = dict(self._status())
            if not status.get("busy"):
                self._work_since = 0.0
            elif not self._work_since:
                self._work_since = time.time()
            return {**status, "work_since": self._work_since, "connected": self.connected()}

    def start(self) -> HealthReporter:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.write()
        self._thread.start()
        return self

    def write(self) -> None:
        """Rewrite the sentinel now (atomically: the check never reads half a file)."""
        info = replace(self.info, seen=time.time(), **self.status())
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"info": asdict(info), "start": self._start, "written": info.seen}))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except OSError as exc:  # a full disk: the check will call this worker hung, which is fair
                log.warning("health sentinel %s not written: %s", self.path, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Verdict:
    """The outcome of one check: ``problems`` empty means healthy."""

    workers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.workers) and not self.problems


def stalled_for(info: WorkerInfo, now: float) -> float:
    """Seconds the worker has held images without resolving any (0 when it holds none)."""
    if info.busy <= 0:
        return 0.0
    return max(0.0, now - max(info.progress, info.work_since or info.started))


def read_sentinels(directory: Path) -> list[tuple[WorkerInfo, float]]:
    """(record, when written) of every live worker process in ``directory``; files of exited ones are removed."""
    found = []
    for path in sorted(directory.glob(SENTINEL_GLOB)):
        try:
            data = json.loads(path.read_text())
            info = WorkerInfo.from_json(json.dumps(data["info"]))
            written, start = float(data["written"]), data.get("start")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if info is None:
            continue
        running = process_start(info.pid)
        if running is None or (start not in (None, "?") and running not in ("?", start)):
            with contextlib.suppress(OSError):  # left by a killed process (its pid is gone or reused)
                path.unlink()
            continue
        found.append((info, written))
    return found


def check(
    settings: Settings,
    *,
    readiness: bool,
    stale_after: float = defaults.HEARTBEAT_TTL_S,
    stall_after: float = defaults.HEALTH_STALL_S,
) -> Verdict:
    """Liveness (``readiness=False``) or readiness of the worker processes that write to this host's
    health directory; see the module docstring."""
    directory = health_dir(settings)
    now = time.time()
    sentinels = read_sentinels(directory)
    verdict = Verdict(workers=[info.id for info, _ in sentinels])
    if not sentinels:
        verdict.problems.append(f"no running imgpipe worker writes its health sentinel to {directory}")
        return verdict
    for info, written in sentinels:
        if now - written > stale_after:
            verdict.problems.append(
                f"worker {info.id} (pid {info.pid}) has not written its sentinel for {now - written:.0f} s: "
                "stopped or hung"
            )
        elif (stalled := stalled_for(info, now)) > stall_after:
            verdict.problems.append(
                f"worker {info.id} holds {info.busy} images and has resolved none for {stalled:.0f} s: batcher hung"
            )
    if not readiness or verdict.problems:
        return verdict
    client = redis.Redis.from_url(
        settings.redis.url, socket_connect_timeout=_REDIS_TIMEOUT_S, socket_timeout=_REDIS_TIMEOUT_S
    )
    try:
        raws = client.mget([keys.worker(info.id) for info, _ in sentinels])
    except (redis.RedisError, OSError) as exc:
        verdict.problems.append(f"Redis at {safe_url(settings.redis.url)} does not answer: {exc}")
        return verdict
    finally:
        client.close()
    for (info, _), raw in zip(sentinels, raws, strict=True):
        registered = WorkerInfo.from_json(raw) if raw is not None else None
        if registered is None:
            verdict.problems.append(f"worker {info.id} is not in the registry: its heartbeat does not reach Redis")
        elif not registered.connected:
            verdict.problems.append(f"worker {info.id} has no broker connection: its consumer is not consuming")
    return verdict
