"""`imgpipe bench` end to end at a tiny size: every variant, every JSON field; no timing assertions."""

from __future__ import annotations

import json
import socket
import statistics
from pathlib import Path
from typing import Any

import pytest
import redis

from imgpipe.bench.cli import LATENCY_SETS, RATIOS, VARIANTS, parse_names
from imgpipe.bench.results import HistogramCounts, Rounds, SuiteResult
from imgpipe.errors import ConfigError
from imgpipe.scratch_redis import scratch_redis
from tests.conftest import cli_env, run_cli

QUEUE_VARIANTS = {"naive", "pipeline", "stream", "watch"}
PEER_VARIANTS = {"dataloader_w0", "dataloader_w2", "dataloader"}


def _summary(stdout: str) -> dict[str, Any]:
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def _check_workload(entry: dict[str, Any], images: int, variants: set[str], rounds: int) -> None:
    assert entry["images"] == images and entry["what"] and entry["model"].endswith(".pt")
    assert set(entry["rates"]) == variants
    assert all(rate > 0 for rate in entry["rates"].values())
    assert entry["rates"]["dataloader"] == max(entry["rates"]["dataloader_w0"], entry["rates"]["dataloader_w2"])
    assert set(entry["rounds"]) == variants - {"dataloader"}  # the paced latency runs are in entry["latency"]
    assert all(len(values) == rounds for values in entry["rounds"].values())
    assert set(entry["ratios"]) == {f"{a}/{b}" for a, b in RATIOS}
    assert set(entry["paired_ratios"]) == set(entry["ratios"])
    for ratio, value in entry["ratios"].items():
        a, b = ratio.split("/")
        paired = entry["paired_ratios"][ratio]
        if a in variants and b in variants:
            assert value == round(entry["rates"][a] / entry["rates"][b], 2)
            side = {v: entry["rounds"].get(v) for v in (a, b)}
            if b == "dataloader":
                peers = zip(entry["rounds"]["dataloader_w0"], entry["rounds"]["dataloader_w2"], strict=True)
                side[b] = [max(w) for w in peers]
            each = sorted(x / y for x, y in zip(side[a], side[b], strict=True))
            assert list(paired) == ["median", "low", "high"]
            assert paired["low"] == round(each[0], 2) and paired["high"] == round(each[-1], 2)
            assert paired["low"] <= paired["median"] <= paired["high"]
        else:
            assert value is None and paired is None


def _check_latency(entry: dict[str, Any], target_ms: int, max_batch: int, rounds: int) -> None:
    assert list(entry) == ["target_ms", "load", "capacity", "arrival_rate", *LATENCY_SETS]
    assert entry["target_ms"] == target_ms and 0 < entry["load"] < 1 and entry["capacity"] > 0
    assert abs(entry["arrival_rate"] - entry["load"] * entry["capacity"]) <= 0.1
    for key in LATENCY_SETS:
        row = entry[key]
        quantiles = ["p50_ms", "p95_ms", "end_to_end_p50_ms", "end_to_end_p95_ms"]
        assert list(row) == ["rate", "mean_batch", *quantiles, "rounds"]
        assert all(isinstance(row[k], float) for k in ("rate", "mean_batch", *quantiles))
        assert row["rate"] > 0 and 1.0 <= row["mean_batch"] <= max_batch
        assert 0 <= row["p50_ms"] <= row["p95_ms"]
        assert 0 <= row["end_to_end_p50_ms"] <= row["end_to_end_p95_ms"]
        # Each image's time from the producer's send holds its time from receipt (and the queue's wait), so its
        # quantiles, estimated from the same buckets, are no smaller (0.1: the JSON's rounding).
        assert row["end_to_end_p50_ms"] >= row["p50_ms"] - 0.1 and row["end_to_end_p95_ms"] >= row["p95_ms"] - 0.1
        assert len(row["rounds"]) == rounds and abs(row["rate"] - statistics.median(row["rounds"])) <= 0.1


def test_every_variant_on_the_digits_with_a_scratch_redis_and_every_json_field(
    demo_data: Path, redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    # IMGPIPE_REDIS_URL stands for a user's Redis: the bench must start its own and leave this one alone.
    env = cli_env(IMGPIPE_REDIS_URL=redis_url, IMGPIPE_MAX_BATCH="16")
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench", str(demo_data / "val"), "--workload", "digits", "--images", "40", "--rounds", "2",
        "--variants", ",".join(VARIANTS), "--latency-ms", "40", "--paths", "2000", "--json", str(out),
        "--logs", str(tmp_path / "logs"), env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _summary(result.stdout)
    assert json.loads(out.read_text()) == summary
    assert list(summary) == ["machine", "settings", "workloads", "enqueue"]
    machine = summary["machine"]
    assert machine["cpus"] >= 1 and machine["device"] == "cpu" and machine["contention"] is False
    assert machine["decode_threads"] >= 1 and machine["torch_threads_cpu"] >= 1 and machine["os_cpu_count"] >= 1
    assert summary["settings"] == {
        "rounds": 2, "workers": 1, "processes_per_worker": 1, "batch_size": 16, "chunk_size": 32
    }  # fmt: skip

    digits = summary["workloads"]["digits"]
    _check_workload(digits, 40, {"inprocess", *PEER_VARIANTS, *QUEUE_VARIANTS, "compute", "decode"}, rounds=2)
    bound = digits["bound"]
    assert bound in ("compute", "decode") and digits["rates"][bound] == min(
        digits["rates"]["compute"], digits["rates"]["decode"]
    )
    assert digits["inprocess_of_ceiling"] == round(digits["rates"]["inprocess"] / digits["rates"][bound], 2)
    assert all(value is not None and value > 0 for value in digits["ratios"].values())
    assert digits["mean_batch"]["naive"] == 1.0 and 1.0 <= digits["mean_batch"]["batched"] <= 16
    assert isinstance(digits["per_message_overhead_us"], float)
    # CPU per image: the in-process engine's (this process), and through the queue the worker processes' (/proc),
    # the scratch Redis's (its INFO) and the producer's (the bench process: its sends and polling).
    costs = digits["cpu_us_per_image"]
    assert list(costs) == ["inprocess", "naive", "pipeline", "stream"]
    assert list(costs["inprocess"]) == ["process"] and costs["inprocess"]["process"] > 0
    assert all(list(costs[v]) == ["workers", "redis", "producer"] for v in ("naive", "pipeline", "stream"))
    # Less the idle share (0 where 40 images cost less than the idle rate's noise): never negative.
    assert all(isinstance(used, float) and used >= 0 for parts in costs.values() for used in parts.values())
    assert "cpu us/image stream" in result.stdout and "one Redis core" in result.stdout
    # What the CPU alone allows, where each side has the same cores: inprocess's cost over each variant's whole.
    cpu_bound = digits["cpu_bound_ratios"]
    assert list(cpu_bound) == ["pipeline/inprocess", "stream/inprocess"]
    for variant in ("pipeline", "stream"):
        whole = sum(costs[variant].values())
        assert cpu_bound[f"{variant}/inprocess"] == round(costs["inprocess"]["process"] / whole, 2)
    assert "cpu-bound ratios       pipeline/inprocess" in result.stdout
    # The batched workers' memory around the measured rounds (pipeline, stream, watch and the fixed latency
    # set's paced runs: 4 x 2 rounds x 40 images), from /proc and their images counter.
    rss = digits["worker_rss_mb"]
    assert list(rss) == ["largest_before", "largest_after", "total_before", "total_after", "images", "largest_by_round"]
    assert rss["images"] == 4 * 2 * 40 and len(rss["largest_by_round"]) == 2 and min(rss["largest_by_round"]) > 0
    assert 0 < rss["largest_before"] <= rss["total_before"] and 0 < rss["largest_after"] <= rss["total_after"]
    assert "worker rss MB          largest process" in result.stdout
    # Where the workers' time went, from their stage histograms: every stage observed in every queue variant.
    stages = digits["stage_ms"]
    assert list(stages) == ["naive", "pipeline", "stream"]
    assert all(list(parts) == ["decode", "infer", "write"] for parts in stages.values())
    assert all(isinstance(ms, float) and ms > 0 for parts in stages.values() for ms in parts.values())
    assert "worker ms stream" in result.stdout
    _check_latency(digits["latency"], target_ms=40, max_batch=16, rounds=2)

    enqueue = summary["enqueue"]
    assert (enqueue["unit"], enqueue["paths"], enqueue["chunk_size"], enqueue["messages"]) == ("paths/s", 2000, 32, 63)
    assert set(enqueue["rates"]) == {"baseline_send_task", "imgpipe_enqueuer", "scan"}
    assert set(enqueue["ratios"]) == {"baseline_send_task", "imgpipe_enqueuer"}

    progress = (
        "inprocess",
        "dataloader_w2",
        "naive",
        "pipeline",
        "stream",
        "watch",
        "latency_fixed",
        "latency_adaptive",
    )
    for variant in progress:  # progress lines
        assert f"digits round 2/2: {variant}" in result.stderr
    assert "inprocess/dataloader" in result.stdout and "adaptive p95 target 40 ms" in result.stdout  # the table
    assert client.dbsize() == 0
    # --logs: the workers' logs outlive the scratch folder, one per worker command, each with its start line.
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert {"digits-naive-worker-db1-0.log", "digits-batched-worker-db0-0.log"} <= set(logs), logs
    assert "imgpipe worker" in (tmp_path / "logs" / "digits-batched-worker-db0-0.log").read_text(errors="replace")


def test_photos_workload_against_the_dataloader_peer_under_contention() -> None:
    result = run_cli(
        "bench", "--workload", "photos", "--variants", "inprocess,dataloader", "--photos", "6", "--rounds", "1",
        "--contention", timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _summary(result.stdout)
    assert list(summary) == ["machine", "settings", "workloads"] and summary["machine"]["contention"] is True
    photos = summary["workloads"]["photos"]
    _check_workload(photos, 6, {"inprocess", *PEER_VARIANTS}, rounds=1)
    assert "640x480" in photos["what"] and "mobilenet_v3_small" in photos["what"]
    assert photos["ratios"]["pipeline/inprocess"] is None and photos["ratios"]["inprocess/dataloader"] > 0
    assert not {
        "mean_batch",
        "per_message_overhead_us",
        "cpu_us_per_image",
        "cpu_bound_ratios",
        "worker_rss_mb",
        "stage_ms",
        "bound",
        "inprocess_of_ceiling",
        "latency",
    } & set(photos)


def test_queue_variants_are_skipped_with_one_line_when_redis_server_is_missing(tmp_path: Path) -> None:
    env = cli_env(PATH=str(tmp_path))  # an empty folder: no redis-server on PATH
    result = run_cli("bench", "--variants", "enqueue,pipeline", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[0] == (
        "pipeline, enqueue: skipped: redis-server not found on PATH (Debian/Ubuntu: apt-get install redis-server)"
    )
    summary = _summary(result.stdout)
    assert set(summary["skipped"]) == {"pipeline", "enqueue"} and summary["workloads"] == {}
    assert "Traceback" not in result.stderr


def test_an_unknown_variant_or_workload_is_a_usage_error() -> None:
    result = run_cli("bench", "--variants", "inprocess,gpu", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "imgpipe: error: --variants 'inprocess,gpu': unknown gpu; valid: inprocess, dataloader, naive, pipeline, "
        "stream, watch, compute, decode, enqueue, latency"
    )
    assert run_cli("bench", "--workload", "faces", timeout=60).returncode == 2
    with pytest.raises(ConfigError):
        parse_names(",", ("a",), "--x")
    assert parse_names(" stream, inprocess ", ("inprocess", "stream"), "--x") == ["inprocess", "stream"]


def test_rounds_take_the_median_and_ratios_are_against_each_baseline() -> None:
    rounds = Rounds()
    for rate in (10.0, 30.0, 20.0):
        rounds.add("a", rate)
    assert rounds.median("a") == 20.0 and rounds.median("b") is None
    result = SuiteResult("s", "items/s", "header")
    result.add("base", 100.0, "base")
    result.add("fast", 250.0, "base")
    result.add("alone", 7.0, None)
    assert result.ratios() == {"base": 1.0, "fast": 2.5}
    assert "2.50x" in result.table() and result.table().splitlines()[-1].split()[2] == "-"


def test_latency_quantiles_are_estimated_from_histogram_buckets_as_prometheus_does() -> None:
    inf = float("inf")
    before = HistogramCounts({0.01: 3.0, 0.05: 3.0, 0.1: 3.0, inf: 3.0}, sum=0.015, count=3.0)  # warm-up
    after = HistogramCounts({0.01: 3.0, 0.05: 13.0, 0.1: 23.0, inf: 23.0}, sum=1.515, count=23.0)
    run = after - before
    assert run.buckets == {0.01: 0.0, 0.05: 10.0, 0.1: 20.0, inf: 20.0} and run.count == 20.0
    assert run.mean() == pytest.approx(0.075)
    assert run.quantile(0.5) == pytest.approx(0.05)  # rank 10: the top of the (0.01, 0.05] bucket
    assert run.quantile(0.95) == pytest.approx(0.095)  # rank 19: nine tenths into (0.05, 0.1]
    assert (run + run).quantile(0.95) == pytest.approx(0.095) and (run + run).count == 40.0
    assert HistogramCounts({0.1: 0.0, inf: 5.0}).quantile(0.5) == 0.1  # beyond the last bound: that bound
    assert HistogramCounts({0.1: 4.0, inf: 4.0}).quantile(0.5) == pytest.approx(0.05)  # first bucket: from 0
    assert HistogramCounts({}).quantile(0.5) is None and HistogramCounts({}).mean() is None
    with pytest.raises(ValueError):
        run.quantile(1.5)


def test_scratch_redis_answers_while_open_and_is_gone_after(tmp_path: Path) -> None:
    with scratch_redis(tmp_path) as url:
        port = int(url.rsplit(":", 1)[1])
        scratch = redis.Redis.from_url(url + "/0")
        assert scratch.ping() and scratch.set("k", "v")
        assert scratch.config_get("save")["save"] == "" and scratch.config_get("appendonly")["appendonly"] == "no"
        scratch.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
