"""`imgpipe worker --check`: liveness and readiness of real worker processes against a private redis-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from imgpipe import defaults
from imgpipe.health import HealthReporter, check, read_sentinels
from imgpipe.procs import wait_until
from imgpipe.registry import WorkerInfo
from imgpipe.scratch_redis import scratch_redis
from imgpipe.settings import Settings
from tests.conftest import cli_env, run_cli
from tests.workers import Workers

pytestmark = pytest.mark.timeout(240)


def probe(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    return run_cli("worker", "--check", *flags, env=env, timeout=60)


def live(env: dict[str, str]) -> int:
    return probe(env, "--liveness").returncode


def ready(env: dict[str, str]) -> int:
    return probe(env).returncode


def newest_sentinel(health: Path) -> float:
    return max(json.loads(p.read_text())["written"] for p in health.glob("worker-*.json"))


def test_a_worker_whose_redis_stops_is_not_ready_but_stays_live(tmp_path: Path) -> None:
    health = tmp_path / "health"
    with ExitStack() as stack:
        redis_stack = stack.enter_context(ExitStack())
        url = redis_stack.enter_context(scratch_redis(tmp_path / "redis")) + "/0"
        env = cli_env(IMGPIPE_REDIS_URL=url, IMGPIPE_ALLOWED_ROOTS=str(tmp_path), IMGPIPE_HEALTH_DIR=str(health))
        workers = stack.enter_context(Workers(tmp_path, env))
        # Two processes: the supervisor's children each keep a sentinel; the check covers both.
        workers.start("--concurrency", "2", "--device", "cpu", processes=2)

        # Ready once a heartbeat (every 2 s) has seen the consumer connected.
        result = wait_until(
            lambda: (r := probe(env)).returncode == 0 and r, 30, "ready", check=workers.started[0].check_alive
        )
        assert result.stdout.startswith("ready: 2 worker process(es)"), result.stdout
        assert live(env) == 0

        redis_stack.close()  # Redis gone: the worker keeps retrying
        stopped = time.time()
        result = probe(env)
        assert result.returncode == 1
        assert "does not answer" in result.stderr, result.stderr
        # The sentinels are still rewritten past the heartbeat TTL with Redis gone, and liveness holds.
        wait_until(lambda: newest_sentinel(health) > stopped + defaults.HEARTBEAT_TTL_S + 1, 60, "sentinel rewritten")
        result = probe(env, "--liveness")
        assert result.returncode == 0, result.stderr + workers.logs()
        assert "heartbeat to Redis failed" in workers.logs()


def test_a_stopped_worker_is_neither_live_nor_ready_and_recovers_when_continued(tmp_path: Path) -> None:
    health = tmp_path / "health"
    with scratch_redis(tmp_path / "redis") as server:
        env = cli_env(
            IMGPIPE_REDIS_URL=server + "/0", IMGPIPE_ALLOWED_ROOTS=str(tmp_path), IMGPIPE_HEALTH_DIR=str(health)
        )
        with Workers(tmp_path, env) as workers:
            worker = workers.start("--device", "cpu")
            wait_until(lambda: ready(env) == 0, 30, "ready", check=worker.check_alive)
            os.kill(worker.pid, signal.SIGSTOP)  # hung: no thread of it runs
            try:
                result = wait_until(lambda: (r := probe(env, "--liveness")).returncode == 1 and r, 90, "not live")
                assert "stopped or hung" in result.stderr, result.stderr
                assert ready(env) == 1
            finally:
                os.kill(worker.pid, signal.SIGCONT)
            wait_until(lambda: ready(env) == 0, 60, "ready again after SIGCONT")


def test_no_worker_is_not_live(tmp_path: Path) -> None:
    env = cli_env(IMGPIPE_HEALTH_DIR=str(tmp_path / "empty"))
    result = probe(env, "--liveness")
    assert result.returncode == 1
    assert "no running imgpipe worker" in result.stderr


def _settings(health: Path) -> Settings:
    settings = Settings()
    return settings.with_section(worker=replace(settings.worker, health_dir=health))


def test_a_process_holding_images_without_progress_is_hung_and_dead_processes_are_forgotten(tmp_path: Path) -> None:
    """The stall rule, on real sentinel files: this test process plays the worker (its pid runs)."""
    health = tmp_path / "health"
    now = time.time()
    me = WorkerInfo(id="imgpipe-test@here", host="here", pid=os.getpid(), model="m", device="cpu",
                    queues=("imgpipe",), started=now - 1000)  # fmt: skip
    state = {"busy": 0, "progress": 0.0}
    reporter = HealthReporter(health, me, lambda: dict(state)).start()
    try:
        assert check(_settings(health), readiness=False).ok  # idle: nothing to do is healthy
        state.update(busy=5, progress=now - 1000)  # work arrives after a long idle time: not a stall yet
        reporter.write()
        assert check(_settings(health), readiness=False).ok
        # The same images still unresolved past the stall limit: hung.
        time.sleep(0.01)
        verdict = check(_settings(health), readiness=False, stall_after=0.001)
        assert not verdict.ok and "batcher hung" in verdict.problems[0], verdict
        state.update(progress=time.time())
        reporter.write()
        assert check(_settings(health), readiness=False, stall_after=1.0).ok

        # A sentinel left by a process that is gone (kill -9) is removed, not counted.
        gone = subprocess.Popen(["true"])
        gone.wait()
        (health / f"worker-{gone.pid}.json").write_text(
            json.dumps({"info": {**json.loads(me.to_json()), "pid": gone.pid}, "start": "1", "written": now})
        )
        assert [info.pid for info, _ in read_sentinels(health)] == [os.getpid()]
        assert not (health / f"worker-{gone.pid}.json").exists()
    finally:
        reporter.close()
    assert not list(health.glob("worker-*.json"))


def test_a_heartbeat_with_fields_this_version_does_not_know_still_reads() -> None:
    record = json.loads(
        WorkerInfo(id="w", host="h", pid=1, model="m", device="cpu", queues=("q",), started=1).to_json()
    )
    info = WorkerInfo.from_json(json.dumps({**record, "lease_count": 3}))
    assert info is not None and info.queues == ("q",)
    assert WorkerInfo.from_json("[1, 2]") is None
