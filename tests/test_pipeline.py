"""End to end with real Redis and real `imgpipe worker` processes: parity with classify, sharing, kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from imgpipe import keys
from imgpipe.jobs import iter_records
from imgpipe.procs import wait_until
from imgpipe.records import read_records
from tests.conftest import cli_env, free_port, run_cli
from tests.images import write_good
from tests.workers import enqueue_cli, histogram, scrape, wait_for_job, workers_for


def _exactly_once(client: redis.Redis, job_id: str, expected: set[str]) -> dict[str, dict[str, object]]:
    records = list(iter_records(client, job_id))
    paths = [str(r["path"]) for r in records]
    assert len(paths) == len(set(paths)), "a path has two records"
    assert set(paths) == expected, (sorted(expected - set(paths))[:5], sorted(set(paths) - expected)[:5])
    return {str(r["path"]): r for r in records}


def test_a_nested_folder_gets_one_record_per_image_with_the_labels_of_classify(
    tmp_path: Path, redis_url: str, client: redis.Redis, demo_data: Path
) -> None:
    images = {str(p) for p in demo_data.rglob("*.png")}
    assert len(images) >= 500
    with workers_for(tmp_path, redis_url, demo_data) as workers:
        workers.start()
        result = run_cli("enqueue", str(demo_data), "--wait", env=cli_env(IMGPIPE_REDIS_URL=redis_url), timeout=180)
        assert result.returncode == 0, result.stderr + workers.logs()
    job_id = result.stdout.strip()
    assert f"job {job_id} done: {len(images)} ok, 0 failed of {len(images)}" in result.stderr

    env = cli_env(IMGPIPE_REDIS_URL=redis_url)
    exported = run_cli("results", job_id, "-o", str(tmp_path / "labels.csv"), env=env, timeout=120)
    assert exported.returncode == 0, exported.stderr
    distributed = {str(r["path"]): r for r in read_records(tmp_path / "labels.csv")}
    assert len(distributed) == len(images) == len(read_records(tmp_path / "labels.csv"))
    _exactly_once(client, job_id, images)
    streamed = run_cli("results", job_id, "--format", "jsonl", env=env, timeout=120)
    assert sorted(json.loads(line)["path"] for line in streamed.stdout.splitlines()) == sorted(images)

    embedded = run_cli("classify", str(demo_data), "-o", str(tmp_path / "embedded.jsonl"), timeout=180)
    assert embedded.returncode == 0, embedded.stderr
    local = {str(r["path"]): r for r in read_records(tmp_path / "embedded.jsonl")}
    assert local.keys() == distributed.keys()
    for path, record in distributed.items():
        assert record["status"] == "ok"
        assert record["label"] == local[path]["label"], path
        assert [name for name, _ in record["topk"]] == [name for name, _ in local[path]["topk"]]  # type: ignore
        assert abs(float(record["score"]) - float(local[path]["score"])) < 1e-4  # type: ignore[arg-type]
        assert record["model"] == local[path]["model"]
    val = [r for p, r in distributed.items() if "/val/" in p]
    accuracy = sum(r["label"] == Path(str(r["path"])).parent.name for r in val) / len(val)
    assert accuracy >= 0.9, accuracy


def test_two_workers_at_once_lose_and_repeat_no_image(tmp_path: Path, redis_url: str, client: redis.Redis) -> None:
    data = tmp_path / "data"
    images = {str(p) for p in write_good(data / "x", 200) + write_good(data / "y" / "z", 100, start=200)}
    # Small prefetch and batches, so that neither worker takes the whole queue at once.
    with workers_for(tmp_path, redis_url, data, IMGPIPE_PREFETCH="4", IMGPIPE_MAX_BATCH="8") as workers:
        first, second = workers.start(ready=False), workers.start(ready=False)
        first.wait_ready()
        second.wait_ready()
        job_id = enqueue_cli(redis_url, str(data), "--chunk-size", "4")
        job = wait_for_job(client, job_id, timeout=120, workers=workers)
        assert (int(job["total"]), int(job["done"]), int(job["failed"])) == (300, 300, 0)
        records = _exactly_once(client, job_id, images)
        assert all(r["status"] == "ok" for r in records.values())
        for worker in (first, second):
            assert "recorded" in worker.log(), f"one worker did no work:\n{workers.logs()}"


def test_kill_9_mid_job_then_a_new_worker_completes_it_counting_each_image_once(
    tmp_path: Path, redis_url: str, client: redis.Redis
) -> None:
    data = tmp_path / "data"
    # Enough images that the job outlasts a stall of this test's polling on a loaded machine: with 600 a fast
    # worker once finished them all in the gap between two polls, and none was left held to kill it over.
    images = {str(p) for p in write_good(data / "a", 900) + write_good(data / "b" / "c", 900, start=900)}
    env = {"IMGPIPE_VISIBILITY_TIMEOUT": "3", "IMGPIPE_PREFETCH": "6", "IMGPIPE_MAX_BATCH": "8"}
    with workers_for(tmp_path, redis_url, data, **env) as workers:
        doomed = workers.start()
        job_id = enqueue_cli(redis_url, str(data), "--chunk-size", "8")

        def frozen_holding_messages() -> bool:
            """Stopped (SIGSTOP: no thread of it runs, so what it holds cannot change) while it holds messages;
            between two groups it may briefly hold none, and then it runs on."""
            os.killpg(doomed.pid, signal.SIGSTOP)
            if client.hlen("unacked") > 0:
                return True
            os.killpg(doomed.pid, signal.SIGCONT)
            return False

        def finished() -> None:
            doomed.check_alive()
            if client.hget(keys.job(job_id), "finished"):
                raise AssertionError("the worker finished the job before it was caught holding messages")

        wait_until(
            lambda: (
                sum(int(v or 0) for v in client.hmget(keys.job(job_id), ["done", "failed"])) >= 40
                and frozen_holding_messages()
            ),
            60,
            "40 records written, messages held",
            interval=0.005,
            check=finished,
        )
        doomed.kill9()  # SIGKILL ends a stopped process too
        completed = sum(int(v or 0) for v in client.hmget(keys.job(job_id), ["done", "failed"]))
        held = client.hlen("unacked")  # kombu's record of messages taken and not acknowledged
        assert completed < len(images), "the worker finished before it could be killed; use more images"
        assert held > 0, "the killed worker held no message: nothing was redelivered"

        workers.start()
        job = wait_for_job(client, job_id, timeout=120, workers=workers)
    assert (int(job["total"]), int(job["done"]), int(job["failed"])) == (len(images), len(images), 0)
    records = _exactly_once(client, job_id, images)
    assert all(r["status"] == "ok" for r in records.values())
    assert client.hlen("unacked") == 0


def test_a_chunked_job_spreads_over_every_worker_instead_of_the_first_one_taking_it_all(
    tmp_path: Path, redis_url: str, client: redis.Redis
) -> None:
    """Workers hold a bounded number of images, not of messages (worker/app.py ``hold_images``): with a batch of 8
    and one lane each holds 16 images, 2 messages of 8. Before, the prefetch count was 16 messages, and the first
    worker to wake took 16 of the job's 20 messages while the other idled.

    Each image takes a while (a 1600x1600 noise PNG, hard-linked 160 times) so that the split is decided by the
    bound, not by which worker's event loop happened to wake first: with the 8-path digits of write_good one
    worker could finish the whole job in the 100-odd ms the other took to see its first message."""
    data = tmp_path / "data"
    data.mkdir()
    big = data / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1600, 1600), dtype=np.uint8)).save(big)
    images = set()
    for i in range(160):
        path = data / f"img{i:03d}.png"
        os.link(big, path)
        images.add(str(path))
    big.unlink()
    small = tmp_path / "small"
    write_good(small, 16)
    ports = [free_port(), free_port()]
    env = {"IMGPIPE_MAX_BATCH": "8", "IMGPIPE_DECODE_THREADS": "1", "IMGPIPE_ALLOW_HARDLINKS": "1"}

    def done_per_worker() -> list[int]:
        found = [re.search(r'imgpipe_images_total\{status="ok"\} (\d+)', scrape(port)) for port in ports]
        return [int(match.group(1)) if match else 0 for match in found]

    with workers_for(tmp_path, redis_url, tmp_path, **env) as workers:
        for port in ports:
            workers.start("--metrics-port", str(port))
        # First a one-path job (as `imgpipe watch` sends): the workers' recent paths per message is then 1, and
        # they must still take the chunked job by the images they may hold (TAKE_LUA's imgpipe_paths count), not
        # 16 chunks of 8 at their one-path estimate.
        stream_job = enqueue_cli(redis_url, str(small), "--chunk-size", "1")
        wait_for_job(client, stream_job, timeout=120, workers=workers)
        before = done_per_worker()
        job_id = enqueue_cli(redis_url, str(data), "--chunk-size", "8")
        wait_for_job(client, job_id, timeout=120, workers=workers)
        _exactly_once(client, job_id, images)
        done = [after - earlier for after, earlier in zip(done_per_worker(), before, strict=True)]
        assert sum(done) == 160 and min(done) >= 40, f"images per worker: {done}\n{workers.logs()}"


def test_concurrency_runs_child_processes_and_serves_their_summed_metrics(
    tmp_path: Path, redis_url: str, client: redis.Redis
) -> None:
    data = tmp_path / "data"
    images = {str(p) for p in write_good(data, 120)}
    port = free_port()
    with workers_for(tmp_path, redis_url, data, IMGPIPE_PREFETCH="4", IMGPIPE_MAX_BATCH="8") as workers:
        supervisor = workers.start("--concurrency", "2", "--device", "cpu", "--metrics-port", str(port), processes=2)
        job_id = enqueue_cli(redis_url, str(data), "--chunk-size", "4")
        wait_for_job(client, job_id, timeout=120, workers=workers)
        _exactly_once(client, job_id, images)
        text = scrape(port)
        assert 'imgpipe_images_total{status="ok"} 120.0' in text, text
        batches = histogram(text, "imgpipe_batch_size")
        assert batches["sum"] == 120.0
        log = supervisor.log()
        assert len(re.findall(r"imgpipe worker \d+: model", log)) == 2 and "2 processes on cpu, cpu" in log

        # A child that dies is replaced, and the replacement works.
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(supervisor.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        supervisor.wait_ready(processes=3)
        assert "starting another" in supervisor.log()
        again = enqueue_cli(redis_url, str(data / "img00000.png"))
        wait_for_job(client, again, timeout=60, workers=workers)
        code = supervisor.stop()
    assert code == 0, workers.logs()
