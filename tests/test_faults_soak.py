"""Soak (opt-in: `pytest -m soak`): random kill -9 of workers and of Redis (AOF always) over many images.

Size with IMGPIPE_SOAK_IMAGES (default 20,000 16x16 PNGs; the issue asks 100,000 on a bigger machine).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import redis

from imgpipe import keys
from tests.conftest import cli_env
from tests.test_faults import _job, _small
from tests.workers import AofRedis, Workers, assert_exactly_once, wait_for_job


@pytest.mark.soak
def test_soak_random_kills_of_workers_and_redis(tmp_path: Path) -> None:
    count = int(os.environ.get("IMGPIPE_SOAK_IMAGES", "20000"))
    data = tmp_path / "data"
    inputs = {str(p) for p in _small(data, count)}
    rng = random.Random(8)
    kills = {"worker": 0, "redis": 0}
    with AofRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        env = cli_env(IMGPIPE_REDIS_URL=server.url, IMGPIPE_ALLOWED_ROOTS=str(data))
        with Workers(tmp_path, env) as workers:
            live = [workers.start(), workers.start()]
            job_id = _job(client, server.url, sorted(inputs), [str(data)])
            deadline = time.monotonic() + 1800
            while not client.hget(keys.job(job_id), "finished"):
                assert time.monotonic() < deadline, workers.logs()[-20000:]
                time.sleep(rng.uniform(3, 8))
                if rng.random() < 0.7:
                    victim = live.pop(rng.randrange(len(live)))
                    victim.kill9()
                    kills["worker"] += 1
                    live.append(workers.start())
                else:
                    server.kill9()
                    kills["redis"] += 1
                    time.sleep(1)
                    server.start()
            wait_for_job(client, job_id, timeout=60, workers=workers)
            assert_exactly_once(client, job_id, inputs)
            print(f"soak: {count} images, {kills['worker']} worker kills, {kills['redis']} Redis kills: exactly once")
        client.close()
