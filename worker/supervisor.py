"""The multi-process worker: one child `imgpipe worker` per device, restarted with back-off when it dies, and
their summed /metrics served from here (prometheus_client multiprocess mode)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import time
from types import FrameType

from imgpipe.procs import imgpipe_argv
from imgpipe.settings import Settings

log = logging.getLogger("imgpipe.worker")

# prometheus_client's variable (imgpipe.worker.metrics.MULTIPROC_ENV), set here before prometheus_client is imported.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds a child must have run for its exit not to count as a failure to start.
_MIN_CHILD_UPTIME_S = 10.0
# Failures to start in a row (backing off 2, 4, 8... s between them) before the supervisor gives up.
_MAX_QUICK_FAILURES = 5


class Supervisor:
    """Runs one child `imgpipe worker` per device, restarts those that crash, and serves their metrics."""

    def __init__(self, settings: Settings, devices: list[str], loglevel: str) -> None:
        self.settings = settings
        self.devices = devices
        self.loglevel = loglevel
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.restarts: dict[int, float] = {}  # index -> when to start it again
        self.quick_failures: dict[int, int] = {}
        self.stopping = False
        self.exit_code = 0
        self.metrics_dir = tempfile.mkdtemp(prefix="imgpipe-metrics-")

    def run(self) -> int:
        os.environ[_MULTIPROC_ENV] = self.metrics_dir  # for this process's collector and every child
        from imgpipe.worker import metrics_server

        server = metrics_server.start_metrics_server(self.settings.metrics)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._forward_hup)  # each child reloads its model (worker/run.py)
        log.info(
            "imgpipe worker supervisor %d: %d processes on %s%s",
            os.getpid(),
            len(self.devices),
            ", ".join(self.devices),
            f"; metrics on port {server.port}" if server is not None else "",
        )
        try:
            for index in range(len(self.devices)):
                self._spawn(index)
            while self.children or self.restarts:
                time.sleep(0.2)
                self._reap()
        finally:
            for child, _ in self.children.values():
                child.kill()
            if server is not None:
                server.close()
        return self.exit_code

    def _command(self, index: int) -> list[str]:
        s = self.settings
        command = [
            *imgpipe_argv("worker"),
            "--concurrency",
            "1",
            "--device",
            self.devices[index],
            "--model",
            str(s.model.resolved_path()),
            "--allowed-roots",
            os.pathsep.join(str(r) for r in s.security.allowed_roots),
            "--max-batch",
            str(s.batch.max_batch),
            "--max-wait-ms",
            str(s.batch.max_wait_ms),
            "--decode-threads",
            str(s.batch.decode_threads),
            "--loglevel",
            self.loglevel,
            "--parent-pid",
            str(os.getpid()),
        ]
        if s.worker.prefetch is not None:
            command += ["--prefetch", str(s.worker.prefetch)]
        return command

    def _spawn(self, index: int) -> None:
        env = dict(os.environ)
        env["IMGPIPE_METRICS_PORT"] = ""  # the supervisor serves them all
        env["IMGPIPE_REDIS_URL"] = self.settings.redis.url  # not on the command line: it may hold a password
        env["IMGPIPE_RELOAD"] = str(self.settings.worker.reload)  # --reload and --pinned-only, as the flags said
        env["IMGPIPE_PINNED_ONLY"] = str(self.settings.worker.pinned_only)
        if self.devices[index] == "cpu":
            # Share the cores between the CPU processes instead of each using all of them: each has
            # --decode-threads lanes and its share of cores over them for torch (worker/cli.py share_cores).
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.devices)))
            env["IMGPIPE_TORCH_THREADS"] = str(self.settings.batch.torch_threads)
        child = subprocess.Popen(self._command(index), env=env)
        self.children[index] = (child, time.monotonic())
        log.info("worker process %d (pid %d) on %s started", index, child.pid, self.devices[index])

    def _reap(self) -> None:
        now = time.monotonic()
        for index, (child, started) in list(self.children.items()):
            code = child.poll()
            if code is None:
                continue
            del self.children[index]
            if self.stopping:
                continue
            if code == 2:  # a configuration error: another try would fail the same way
                log.error("worker process %d (pid %d) could not start; stopping", index, child.pid)
                self.exit_code = 2
                self._stop_children()
                continue
            quick = now - started < _MIN_CHILD_UPTIME_S
            self.quick_failures[index] = self.quick_failures.get(index, 0) + 1 if quick else 0
            if self.quick_failures[index] > _MAX_QUICK_FAILURES:
                log.error("worker process %d keeps exiting right after it starts (exit %d); stopping", index, code)
                self.exit_code = 1
                self._stop_children()
                continue
            delay = min(30.0, 2.0 ** self.quick_failures[index])
            log.warning(
                "worker process %d (pid %d) exited with %d; starting another in %.0f s", index, child.pid, code, delay
            )
            self.restarts[index] = now + delay
        for index, when in list(self.restarts.items()):
            if self.stopping:
                del self.restarts[index]
            elif now >= when:
                del self.restarts[index]
                self._spawn(index)

    def _forward_hup(self, signum: int, frame: FrameType | None) -> None:
        for proc, _started in list(self.children.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:  # a second Ctrl-C: do not wait for running batches
            for child, _ in self.children.values():
                child.kill()
            return
        log.info("stopping %d worker processes (they finish the messages they hold)", len(self.children))
        self._stop_children()

    def _stop_children(self) -> None:
        self.stopping = True
        for child, _ in self.children.values():
            if child.poll() is None:
                child.terminate()
