"""A throw-away redis-server of our own on a free loopback port, for benchmarks and tests (never the user's)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import redis

from imgpipe.errors import ImgpipeError

# Tries with a new free port when the server exits at once (another process took the port in between).
_START_TRIES = 3


class ScratchRedisError(ImgpipeError):
    """redis-server is not installed, or it did not start."""


def find_redis_server() -> str | None:
    """The redis-server binary on PATH, or None."""
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _is_ours(port: int, pid: int) -> bool:
    """The server on ``port`` answers and is process ``pid`` (not some other Redis that took the port)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=2)
    try:
        return int(client.info("server")["process_id"]) == pid
    except (redis.RedisError, OSError, KeyError, ValueError):
        return False
    finally:
        client.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def scratch_redis(workdir: Path | None = None, binary: str | None = None, timeout: float = 10.0) -> Iterator[str]:
    """Start ``redis-server --port <free> --bind 127.0.0.1 --save "" --appendonly no`` and yield its URL
    (``redis://127.0.0.1:PORT``, no database number); stop it on exit.

    It keeps nothing on disk but its log, in ``workdir`` (a temporary folder when None). Raises
    ScratchRedisError when redis-server is missing or does not answer PING within ``timeout`` seconds.
    """
    binary = binary or find_redis_server()
    if binary is None:
        raise ScratchRedisError("redis-server not found on PATH (Debian/Ubuntu: apt-get install redis-server)")
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgpipe-redis-")))
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "redis.log"
        for _ in range(_START_TRIES):
            port = free_port()
            try:
                proc = subprocess.Popen(
                    [
                        binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(workdir),
                        "--logfile",
                        str(log),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            except OSError as exc:
                raise ScratchRedisError(f"cannot run {binary}: {exc.strerror or exc}") from None
            stack.callback(_stop, proc)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and not _is_ours(port, proc.pid):
                if time.monotonic() > deadline:
                    raise ScratchRedisError(f"redis-server did not answer on port {port} within {timeout:.0f} s")
                time.sleep(0.05)
            if proc.poll() is None:
                break
        else:
            tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
            raise ScratchRedisError(f"redis-server exited at start ({_START_TRIES} tries): {tail.strip()}")
        yield f"redis://127.0.0.1:{port}"
