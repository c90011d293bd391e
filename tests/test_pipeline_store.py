"""The worker's result store on a real Redis: write-once records, exact counts, finishing, dead letters."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import redis

from imgpipe import keys
from imgpipe.jobs import add_to_total, create_job, job_status, seal_job
from imgpipe.records import error_record, ok_record
from imgpipe.worker.store import ResultStore

TTL = 3600
MODEL = "m@123"


def _job(client: redis.Redis, total: int) -> str:
    job_id = create_job(client, None, kind="batch", roots=["/d"], ttl_seconds=TTL)
    pipe = client.pipeline()
    add_to_total(pipe, job_id, total, TTL)
    pipe.execute()
    return job_id


def test_a_redelivered_message_never_adds_or_counts_a_record_twice(client: redis.Redis) -> None:
    job_id = _job(client, 3)
    store = ResultStore(client, TTL)
    first = [ok_record("/d/a.png", [("7", 0.9)], MODEL), error_record("/d/b.png", "bad", MODEL, "decode")]
    assert store.write(job_id, first, MODEL) == first
    # The same message again (redelivered after its records were written but before the ack), plus one new path:
    # only the new one is written and counted, and the first record of a path wins.
    again = [
        ok_record("/d/a.png", [("1", 0.5)], MODEL),
        ok_record("/d/b.png", [("2", 0.5)], MODEL),
        ok_record("/d/c.png", [("3", 0.8)], MODEL),
    ]
    assert store.write(job_id, again, MODEL) == [again[2]]
    assert store.write(job_id, again, MODEL) == []
    status = job_status(client, job_id)
    assert (status.done, status.failed, status.total) == (2, 1, 3)
    assert not status.finished  # not sealed yet: more images may come
    assert json.loads(client.hget(keys.job_results(job_id), "/d/a.png") or b"")["label"] == "7"
    assert seal_job(client, job_id)
    status = job_status(client, job_id)
    assert status.finished and status.done + status.failed == status.total
    assert client.hget(keys.job(job_id), "model") == MODEL.encode()
    assert 0 < client.ttl(keys.job_results(job_id)) <= TTL


def test_the_last_write_of_a_sealed_job_finishes_it(client: redis.Redis) -> None:
    job_id = _job(client, 2)
    store = ResultStore(client, TTL)
    seal_job(client, job_id)
    store.write(job_id, [ok_record("/d/a.png", [("7", 0.9)], MODEL)], MODEL)
    assert not job_status(client, job_id).finished
    store.write(job_id, [ok_record("/d/b.png", [("7", 0.9)], MODEL)], MODEL)
    status = job_status(client, job_id)
    # Both records came within a second: a duration, not a rate made up from microseconds.
    assert status.finished and status.rate is None and status.took is not None and status.took >= 0


def test_begin_counts_deliveries_and_lists_paths_without_records(client: redis.Redis) -> None:
    job_id = _job(client, 3)
    store = ResultStore(client, TTL)
    paths = ["/d/a.png", "/d/b.png", "/d/c.png"]
    first = store.begin("msg-1", job_id, paths)
    assert (first.count, first.last_error, first.job_exists, first.todo) == (1, None, True, paths)
    store.write(job_id, [ok_record("/d/b.png", [("7", 0.9)], MODEL)], MODEL)
    store.note_failure("msg-1", "RuntimeError: boom")
    second = store.begin("msg-1", job_id, paths)
    assert (second.count, second.last_error, second.todo) == (2, "RuntimeError: boom", ["/d/a.png", "/d/c.png"])
    store.forget("msg-1", job_id)
    assert store.begin("msg-1", job_id, paths).count == 1
    assert not store.begin("msg-2", "no-such-job", paths).job_exists


def test_unknown_job_writes_nothing_and_dead_letters_are_pushed_once(client: redis.Redis) -> None:
    store = ResultStore(client, TTL)
    assert store.write("no-such-job", [ok_record("/d/a.png", [("7", 0.9)], MODEL)], MODEL) is None
    assert not client.exists(keys.job_results("no-such-job"))

    job_id = _job(client, 1)
    records = [error_record("/d/a.png", "gave up", MODEL, "dead_letter")]
    entry = {"job": job_id, "paths": ["/d/a.png"], "reason": "killed", "deliveries": 3}
    assert store.write(job_id, records, MODEL, dead_letter=entry) == records
    assert store.write(job_id, records, MODEL, dead_letter=entry) == []
    assert [json.loads(x) for x in client.lrange(keys.DEAD_LETTER, 0, -1)] == [entry]


def test_worker_registry_lists_live_workers_and_forgets_dead_ones(client: redis.Redis) -> None:
    from imgpipe.registry import Heartbeat, WorkerInfo, live_workers, queues_served

    info = WorkerInfo(id="imgpipe-1@h", host="h", pid=1, model="m@abc", device="cpu", queues=("imgpipe",), started=1.0)
    beat = Heartbeat(client, info, lambda: {"busy": 3, "progress": 5.0}, interval=0.1, ttl=0.5).start()
    try:
        (live,) = live_workers(client, ttl=0.5)
        assert (live.id, live.model, live.busy, live.progress, live.queues) == (
            "imgpipe-1@h",
            "m@abc",
            3,
            5.0,
            ("imgpipe",),
        )
        assert queues_served([live]) == {"imgpipe"}
    finally:
        beat.close()
    assert live_workers(client, ttl=0.5) == []  # a clean stop leaves the list at once
    # A worker that dies without a word (kill -9) vanishes when its heartbeat expires.
    Heartbeat(client, replace(info, id="imgpipe-2@h"), interval=60, ttl=0.3).beat()
    assert [w.id for w in live_workers(client, ttl=0.3)] == ["imgpipe-2@h"]
    time.sleep(0.5)
    assert live_workers(client, ttl=0.3) == []
    client.set(keys.worker("junk"), "not json")
    client.zadd(keys.WORKERS, {"junk": time.time()})
    assert live_workers(client) == []  # a record not written by imgpipe is ignored, never an exception
