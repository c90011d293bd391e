"""`imgpipe bench`: the enqueue and pipeline suites at small sizes on a scratch Redis; skipped without one."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import redis

from imgpipe.bench.cli import SuiteResult, parse_suites
from imgpipe.errors import ConfigError
from imgpipe.scratch_redis import scratch_redis
from tests.conftest import cli_env, run_cli


def _summary(stdout: str) -> dict[str, Any]:
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def test_enqueue_and_pipeline_suites_report_rates_and_ratios_without_touching_imgpipe_redis_url(
    demo_data: Path, redis_url: str, client: redis.Redis
) -> None:
    # IMGPIPE_REDIS_URL stands for a user's Redis: the bench must start its own and leave this one alone.
    env = cli_env(IMGPIPE_REDIS_URL=redis_url, IMGPIPE_MAX_BATCH="3")
    result = run_cli(
        "bench",
        str(demo_data / "val"),
        "--suite",
        "pipeline,enqueue",
        "--paths",
        "2000",
        "--scan-files",
        "2000",
        "--pipeline-images",
        "60",
        "--repeat",
        "1",
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _summary(result.stdout)
    assert list(summary) == ["enqueue", "pipeline"]  # fixed order, whatever order --suite names them in

    enqueue = summary["enqueue"]
    assert (enqueue["unit"], enqueue["paths"], enqueue["chunk_size"], enqueue["messages"]) == ("paths/s", 2000, 32, 63)
    assert set(enqueue["rates"]) == {"baseline_send_task", "imgpipe_enqueuer", "scan"}
    assert enqueue["ratios"]["baseline_send_task"] == 1.0 and set(enqueue["ratios"]) == {
        "baseline_send_task",
        "imgpipe_enqueuer",
    }

    pipeline = summary["pipeline"]
    assert (pipeline["unit"], pipeline["images"]) == ("images/s", 60)
    assert set(pipeline["rates"]) == {"worker_max_batch1", "worker_max_batch64"}
    assert pipeline["ratios"]["worker_max_batch1"] == 1.0 and set(pipeline["ratios"]) == set(pipeline["rates"])
    assert pipeline["mean_batch"]["max_batch1"] == 1.0  # the baseline never batches
    for suite in summary.values():
        assert all(rate > 0 for rate in suite["rates"].values())
        assert all(ratio > 0 for ratio in suite["ratios"].values())
    for header in ("enqueue: 2000 synthetic paths", "pipeline: 60 images, one per message", "worker_max_batch64"):
        assert header in result.stdout

    assert client.dbsize() == 0


def test_redis_suites_are_skipped_with_one_line_when_redis_server_is_missing(tmp_path: Path) -> None:
    env = cli_env(PATH=str(tmp_path))  # an empty folder: no redis-server on PATH
    result = run_cli("bench", "--suite", "enqueue,pipeline", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line for line in lines if line.strip()][:2] == [
        "enqueue: skipped: redis-server not found on PATH (Debian/Ubuntu: apt-get install redis-server)",
        "pipeline: skipped: redis-server not found on PATH (Debian/Ubuntu: apt-get install redis-server)",
    ]
    summary = _summary(result.stdout)
    assert set(summary) == {"enqueue", "pipeline"}
    assert all("redis-server not found" in suite["skipped"] for suite in summary.values())
    assert "Traceback" not in result.stderr


def test_an_unknown_suite_is_a_usage_error() -> None:
    result = run_cli("bench", "--suite", "engine,gpu", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "imgpipe: error: --suite 'engine,gpu': unknown suite gpu; valid: engine, photos, enqueue, pipeline"
    )
    with pytest.raises(ConfigError):
        parse_suites(",")
    assert parse_suites(" pipeline, engine ") == ["engine", "pipeline"]


def test_ratios_are_against_each_variants_own_baseline() -> None:
    result = SuiteResult("s", "items/s", "header")
    result.add("base", 100.0, "base")
    result.add("fast", 250.0, "base")
    result.add("alone", 7.0, None)
    assert result.ratios() == {"base": 1.0, "fast": 2.5}
    assert result.summary()["rates"] == {"base": 100.0, "fast": 250.0, "alone": 7.0}
    assert "2.50x" in result.table() and result.table().splitlines()[-1].split()[2] == "-"


def test_scratch_redis_answers_while_open_and_is_gone_after(tmp_path: Path) -> None:
    with scratch_redis(tmp_path) as url:
        port = int(url.rsplit(":", 1)[1])
        scratch = redis.Redis.from_url(url + "/0")
        assert scratch.ping() and scratch.set("k", "v")
        assert scratch.config_get("save")["save"] == "" and scratch.config_get("appendonly")["appendonly"] == "no"
        scratch.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
