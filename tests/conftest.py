"""Shared test fixtures: a private redis-server on a free loopback port, the CLI as a subprocess, the demo model."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis

from imgpipe.procs import imgpipe_argv
from imgpipe.scratch_redis import ScratchRedisError, find_redis_server, scratch_redis
from imgpipe.scratch_redis import free_port as free_port  # re-exported: tests import it from here

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of our own (never the user's): started here, stopped at the end of the session."""
    if find_redis_server() is None:
        pytest.fail("redis-server not found: apt-get install -y redis-server (scripts/test.sh does this)")
    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_redis(tmp_path_factory.mktemp("redis")))
        except ScratchRedisError as exc:
            pytest.fail(str(exc))
        yield url


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


@functools.cache
def _health_dir() -> str:
    path = tempfile.mkdtemp(prefix="imgpipe-test-health-")
    atexit.register(shutil.rmtree, path, True)
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The environment a subprocess `imgpipe` gets: this one, minus IMGPIPE_* from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    env["PYTHONUNBUFFERED"] = "1"
    # Workers' health sentinels in a folder of this test session, never the machine-wide default.
    env["IMGPIPE_HEALTH_DIR"] = _health_dir()
    # One process per `imgpipe worker` (the CPU default is one per core): tests kill, probe and scrape that
    # process; those about several processes pass --concurrency or unset this.
    env["IMGPIPE_CONCURRENCY"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `imgpipe ARGS...` as a user would (a subprocess), capturing its output."""
    return subprocess.run(
        imgpipe_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else cli_env(),
        input=input,
        cwd=REPO,
    )


def build_wheel(workdir: Path) -> Path:
    """The imgpipe wheel, built from a copy of the sources under `workdir`. Never in place: setuptools writes
    build/ and egg-info next to the sources, and two test processes building there at once collide."""
    source = workdir / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("imgpipe", "model", "producer", "worker"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheelhouse = workdir / "wheelhouse"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheelhouse), "."],
        cwd=source, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = wheelhouse.glob("imgpipe-*.whl")
    return wheel


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


# Modules whose tests kill, stop and time real worker processes or keep a core busy (the contention bench): with
# `pytest -n 2 --dist loadgroup` (scripts/test.sh) they run one after another in one test process, never beside
# each other, while the other process takes the rest of the suite. Side by side, a busy core or another test's
# workers could push one of them past its bounds (a supervisor's shutdown took over 20 s once).
HEAVY_MODULES = {
    "test_bench.py",
    "test_faults.py",
    "test_health.py",
    "test_pipeline.py",
    "test_pipeline_failures.py",
    "test_serving.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in HEAVY_MODULES:
            item.add_marker(pytest.mark.xdist_group("heavy"))
