"""Shared test fixtures: a private redis-server on a free loopback port, the CLI as a subprocess, the demo model."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of our own (never the user's): started here, stopped at the end of the session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: apt-get install -y redis-server (scripts/test.sh does this)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"redis-server did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """Database 0 of the test server, emptied before each test (it is ours alone)."""
    client = redis.Redis.from_url(redis_server + "/0")
    client.flushdb()
    client.close()
    yield redis_server + "/0"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A redis-py client on the test server's database 0, closed after the test."""
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment a subprocess `imgpipe` gets: this one, minus IMGPIPE_* from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `imgpipe ARGS...` as a user would (a subprocess), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "imgpipe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else cli_env(),
        input=input,
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset written once per session by `imgpipe demo-data`."""
    out = tmp_path_factory.mktemp("demo")
    result = run_cli("demo-data", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The model file shipped in model/assets (reproduced by tests/test_train.py)."""
    from imgpipe.settings import default_model_path

    path = default_model_path()
    assert path.is_file(), f"{path} missing: run `imgpipe train` (see README)"
    return path
