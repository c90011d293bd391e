"""Messages that keep failing end dead-lettered; messages the broker loses are sent again (real workers)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import redis

from imgpipe import keys
from imgpipe.jobs import create_job, iter_records, seal_job
from imgpipe.procs import ProcessError, wait_until
from imgpipe.producer.enqueue import enqueue_paths
from imgpipe.settings import RedisSettings
from tests.conftest import cli_env, run_cli
from tests.images import write_good
from tests.workers import Workers, wait_for_job

TTL = 3600


def test_a_message_whose_worker_is_killed_every_time_dead_letters_only_the_image_in_work(
    tmp_path: Path, redis_url: str, client: redis.Redis
) -> None:
    data = tmp_path / "data"
    source = write_good(data, 1)[0]
    paths = []
    for i in range(600):  # one message that takes a while: hard links of one small image, one per batch
        link = data / "links" / f"{i:05d}.png"
        link.parent.mkdir(exist_ok=True)
        os.link(source, link)
        paths.append(str(link))
    job_id = create_job(client, None, kind="batch", roots=[str(data)], ttl_seconds=TTL)
    enqueue_paths(client, RedisSettings(url=redis_url), job_id, paths, chunk_size=len(paths))
    seal_job(client, job_id)
    (message_id,) = [m.decode() for m in client.hkeys(keys.job_pending(job_id))]

    env = cli_env(
        IMGPIPE_REDIS_URL=redis_url,
        IMGPIPE_ALLOWED_ROOTS=str(data),
        IMGPIPE_VISIBILITY_TIMEOUT="600",  # leases bring it back, not kombu's visibility timeout
        IMGPIPE_MAX_DELIVERIES="2",
        IMGPIPE_MAX_BATCH="1",
        IMGPIPE_ALLOW_HARDLINKS="1",
        IMGPIPE_LEASE_TTL="3",
    )
    with Workers(tmp_path, env) as workers:
        # Killed while working: first not known to be alone (it becomes a suspect, uncharged), then twice while
        # alone, one image at a time (each kill charged to the message and names the image in work).
        for charged in (0, 0, 1):
            worker = workers.start()
            deadline = time.monotonic() + 60
            working = [b"working", f"imgpipe-{worker.pid}@{socket.gethostname()}".encode()]
            while client.hmget(keys.deliveries(message_id), ["state", "owner"]) != working or (
                charged and not client.hget(keys.deliveries(message_id), "current")
            ):
                assert time.monotonic() < deadline, workers.logs()
                time.sleep(0.005)
            assert int(client.hget(keys.deliveries(message_id), "count") or 0) == charged
            worker.kill9()
            assert int(client.hget(keys.job(job_id), "done") or 0) < 600, "the message finished before the kill"
        culprit = client.hget(keys.deliveries(message_id), "current").decode()

        last = workers.start()
        job = wait_for_job(client, job_id, timeout=90, workers=workers)
        assert (int(job["total"]), int(job["done"]), int(job["failed"])) == (600, 599, 1)
        records = {r["path"]: r for r in iter_records(client, job_id)}
        assert len(records) == 600 and records[culprit]["reason"] == "dead_letter"
        assert records[culprit]["error"].startswith(
            "gave up after 2 deliveries: the worker stopped while processing it"
        )
        (entry,) = [json.loads(x) for x in client.lrange(keys.DEAD_LETTER, 0, -1)]
        assert (entry["job"], entry["message_id"], entry["deliveries"], entry["paths"]) == (
            job_id,
            message_id,
            2,
            [culprit],
        )
        assert "dead-lettered" in last.log()
        # Not looping: the queue stays empty and the message is acknowledged (Celery acks just after the task
        # returns, so allow it a moment past the job's completion).
        with contextlib.suppress(ProcessError):
            wait_until(lambda: client.hlen("unacked") == 0, 15, "unacked empty")
        assert client.llen(RedisSettings().queue) == 0 and client.hlen("unacked") == 0, workers.logs()

        # The worker that dead-lettered it goes on with other work.
        result = run_cli("enqueue", str(source), "--wait", env=cli_env(IMGPIPE_REDIS_URL=redis_url), timeout=60)
        assert result.returncode == 0, result.stderr + workers.logs()


def test_a_message_the_broker_lost_is_sent_again(tmp_path: Path, redis_url: str, client: redis.Redis) -> None:
    data = tmp_path / "data"
    images = {str(p) for p in write_good(data, 20)}
    settings = RedisSettings(url=redis_url)
    job_id = create_job(client, None, kind="batch", roots=[str(data)], ttl_seconds=TTL)
    enqueue_paths(client, settings, job_id, sorted(images), chunk_size=5)
    seal_job(client, job_id)
    # What a worker killed between Redis' BRPOP and kombu's "unacked" bookkeeping leaves behind: nothing.
    assert client.rpop(settings.queue) is not None
    assert client.llen(settings.queue) == 3

    env = cli_env(IMGPIPE_REDIS_URL=redis_url, IMGPIPE_ALLOWED_ROOTS=str(data), IMGPIPE_VISIBILITY_TIMEOUT="2")
    with Workers(tmp_path, env) as workers:
        worker = workers.start()
        job = wait_for_job(client, job_id, timeout=60, workers=workers)
        assert (int(job["done"]), int(job["failed"])) == (20, 0)
        assert {r["path"] for r in iter_records(client, job_id)} == images
        assert "re-sent 1 messages lost from the queue" in worker.log()
        assert client.hlen(keys.job_pending(job_id)) == 0
