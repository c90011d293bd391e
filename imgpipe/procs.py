"""Child processes and waiting: how imgpipe starts itself, stops a process group, and polls until a deadline.

One home for what the worker supervisor, the benchmark harness and the tests all need: the argv that runs the
installed ``imgpipe`` (never the source folder of the current directory), a bounded stop of a whole process
group, a real ``imgpipe worker`` process with its log, and the one wait-until loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from imgpipe.errors import ImgpipeError

T = TypeVar("T")


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, state first (Linux); None when there is no such
    process or no /proc. The name may hold spaces and parentheses, so the text is split at its last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


# Celery's line once a worker process consumes (its hostname is imgpipe-<pid>@<host>).
READY = re.compile(r"imgpipe-\d+@\S+ ready\.")
# The worker's log line naming its /metrics port.
METRICS_PORT = re.compile(r"metrics on port (\d+)")
# Seconds a worker may take to import torch, load the model and connect.
START_TIMEOUT_S = 180.0


class ProcessError(ImgpipeError):
    """A child process exited early, or something waited for did not happen in time."""


def imgpipe_argv(*args: str) -> list[str]:
    """The command line that runs this installation's ``imgpipe`` with ``args`` in a child process.

    ``python -m imgpipe`` would put the current directory first on ``sys.path``: run from a source checkout
    (or a container WORKDIR holding one) it would import the source ``imgpipe/`` folder, which has no
    ``imgpipe.model``. ``-P`` (Python 3.11+) leaves the current directory out; older Pythons drop it by hand.
    """
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "imgpipe", *args]
    launcher = "import sys; del sys.path[0]; from imgpipe.cli import main; sys.argv[0] = 'imgpipe'; main()"
    return [sys.executable, "-c", launcher, *args]


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    check: Callable[[], None] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and return that.

    ``check`` runs before each try and may raise (a child that died); past ``timeout`` seconds a
    ProcessError says ``what`` was being waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ProcessError(f"{what}: not done after {timeout:g} s")
        time.sleep(interval)


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM to a process started with ``start_new_session=True`` and its whole group (Celery's warm
    shutdown), SIGKILL if it does not end within ``timeout``; returns the exit code. Nothing of the group is left.
    """
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            proc.wait(timeout=30)
    else:  # the group leader is gone: make sure nothing of its group is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return int(proc.returncode)


class WorkerProcess:
    """One real ``imgpipe worker`` command in its own process group (its children go with it), logging to a
    file; stopped on exit (SIGTERM, then SIGKILL), whatever happened. Shared by the benchmark and the tests."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            imgpipe_argv("worker", *args),
            env=dict(env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, tail: int | None = None) -> str:
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def check_alive(self) -> None:
        """ProcessError (with the log's end) if the command has exited."""
        if self.proc.poll() is not None:
            raise ProcessError(f"imgpipe worker exited with {self.proc.returncode}:\n{self.log(5000)}")

    def wait_ready(self, processes: int = 1, timeout: float = START_TIMEOUT_S) -> int | None:
        """Wait until ``processes`` Celery workers of this command consume; returns the /metrics port the
        worker logged (None when it serves none)."""
        try:
            wait_until(
                lambda: len(READY.findall(self.log())) >= processes,
                timeout,
                f"imgpipe worker ready ({processes} processes)",
                check=self.check_alive,
            )
        except ProcessError as exc:
            if self.proc.poll() is not None:
                raise
            raise ProcessError(f"{exc}\n{self.log(5000)}") from None
        match = METRICS_PORT.search(self.log())
        return int(match.group(1)) if match else None

    def kill9(self) -> None:
        """kill -9 of the whole command (a machine crash, as far as Redis can tell)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (warm shutdown), then SIGKILL if it does not end in time; returns the exit code."""
        code = stop_process_group(self.proc, timeout)
        self._log.close()
        return code

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
