"""Streaming: `imgpipe watch` sends files as they land, one per message, and a real worker batches them."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from imgpipe.jobs import iter_records
from imgpipe.procs import imgpipe_argv, wait_until
from tests.conftest import REPO, cli_env, free_port, run_cli
from tests.images import write_good
from tests.workers import Workers, histogram, scrape, wait_for_job


def test_files_copied_into_a_watched_folder_come_back_labelled_in_batches(tmp_path: Path, redis_url: str) -> None:
    incoming, staging = tmp_path / "incoming", tmp_path / "staging"
    incoming.mkdir()
    sources = write_good(staging, 40)
    port = free_port()
    env = cli_env(IMGPIPE_REDIS_URL=redis_url, IMGPIPE_ALLOWED_ROOTS=str(incoming))
    client = redis.Redis.from_url(redis_url)
    with Workers(tmp_path, env) as workers:
        workers.start("--metrics-port", str(port), "--max-batch", "16", "--max-wait-ms", "200")
        watch = subprocess.Popen(
            imgpipe_argv("watch", str(incoming), "--job", "stream-1"),
            env=cli_env(IMGPIPE_REDIS_URL=redis_url),
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            assert watch.stdout is not None
            assert watch.stdout.readline() == "stream-1\n"
            time.sleep(1.0)  # the observer is set up
            (incoming / "2024" / "05").mkdir(parents=True)
            for i, source in enumerate(sources):
                shutil.copy(source, incoming / ("2024/05" if i % 2 else "") / source.name)
            expected = {str(incoming / ("2024/05" if i % 2 else "") / s.name) for i, s in enumerate(sources)}
            wait_until(
                lambda: len(list(iter_records(client, "stream-1"))) >= 40, 60, "40 streamed records", interval=0.1
            )
        finally:
            watch.send_signal(signal.SIGINT)
            _out, err = watch.communicate(timeout=30)
        assert watch.returncode == 0, err
        assert "watch stopped: sent 40 images to job stream-1" in err
        job = wait_for_job(client, "stream-1", timeout=30, workers=workers)  # sealed on stop: finished
        assert (int(job["total"]), int(job["done"]), int(job["failed"])) == (40, 40, 0)
        records = list(iter_records(client, "stream-1"))
        assert {r["path"] for r in records} == expected and all(r["label"] for r in records)

        # 40 one-image messages, far fewer inference batches: the worker batched across messages.
        batches = histogram(scrape(port), "imgpipe_batch_size")
        sizes = {bound: count for bound, count in batches["buckets"].items() if count}
        print("batch size histogram (upper bound -> cumulative count):", json.dumps(sizes))
        assert batches["sum"] == 40.0
        assert batches["count"] < 40 and batches["buckets"][1.0] < batches["count"], batches

    status = run_cli("status", "stream-1", "--json", env=cli_env(IMGPIPE_REDIS_URL=redis_url), timeout=60)
    assert json.loads(status.stdout)["state"] == "done"
    client.close()
