"""The worker's result store on a real Redis: write-once records, exact counts, finishing, dead letters."""

from __future__ import annotations

import json
import time

import redis

from imgpipe import keys
from imgpipe.jobs import add_pending, add_to_total, create_job, job_status, seal_job
from imgpipe.leases import Leases, Reconciler
from imgpipe.procs import wait_until
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


def test_leases_charge_only_a_message_that_worked_alone_and_drop_duplicate_copies(client: redis.Redis) -> None:
    job_id = _job(client, 3)
    paths = ["/d/a.png", "/d/b.png", "/d/c.png"]
    one = Leases(client, "worker-1", lease_ttl=30, key_ttl=TTL)
    two = Leases(client, "worker-2", lease_ttl=30, key_ttl=TTL)
    first = one.begin("msg-1", job_id, paths)
    assert (first.state, first.count, first.suspect, first.todo) == ("ok", 0, False, (0, 1, 2))
    assert two.begin("msg-1", job_id, paths).state == "duplicate"  # leased by a live worker
    ResultStore(client, TTL).write(job_id, [ok_record("/d/b.png", [("7", 0.9)], MODEL)], MODEL)
    one.working("msg-1", alone=False)
    one.give_back("msg-1", job_id, "RuntimeError: boom")  # failed beside others: a suspect, not charged
    second = two.begin("msg-1", job_id, paths)
    assert (second.state, second.count, second.suspect, second.todo) == ("ok", 0, True, (0, 2))
    two.working("msg-1", alone=True)
    two.give_back("msg-1", job_id, "RuntimeError: boom")  # failed alone: charged
    third = one.begin("msg-1", job_id, paths)
    assert (third.count, third.last_error) == (1, "RuntimeError: boom")
    one.give_back("msg-1", job_id)  # not started (shutting down): nothing charged
    assert two.begin("msg-1", job_id, paths).count == 1
    two.finish("msg-1", job_id)
    assert one.begin("msg-1", job_id, paths).count == 0
    assert Leases(client, "w", 30, TTL).begin("msg-2", "no-such-job", paths).state == "no_job"


def test_an_expired_working_lease_is_resent_by_the_reconciler(client: redis.Redis) -> None:
    job_id = _job(client, 2)
    paths = ["/d/a.png", "/d/b.png"]
    client.hset(keys.job_pending(job_id), "msg-1", json.dumps({"paths": paths, "at": time.time()}))
    dead = Leases(client, "dead-worker", lease_ttl=1, key_ttl=TTL)
    dead.begin("msg-1", job_id, paths)
    dead.working("msg-1", alone=True)
    sent: list[tuple[str, list[str], str]] = []
    reconciler = Reconciler(client, "no-queue", lambda *a: sent.append(a), owner="me")
    assert reconciler.run_once() == {"expired": 0, "lost": 0}  # still leased; the queue is empty but it is fresh
    wait_until(lambda: reconciler.expired() or None, 10, "the lease expired and the message was sent again")
    assert sent == [(job_id, paths, "msg-1")]
    assert int(client.hget(keys.deliveries("msg-1"), "count") or 0) == 1  # it worked alone: charged


def _date(client: redis.Redis, job_id: str, message_id: str, at: float, index: bool = True) -> None:
    """Make a pending message look sent at ``at`` (in its entry, and in the time index unless told not to)."""
    entry = json.loads(client.hget(keys.job_pending(job_id), message_id) or "{}")
    client.hset(keys.job_pending(job_id), message_id, json.dumps({**entry, "at": at}))
    if index:
        client.zadd(keys.job_pending_times(job_id), {message_id: at})


def test_the_lost_message_check_reads_the_messages_older_than_its_cutoff_not_the_whole_backlog(
    client: redis.Redis,
) -> None:
    job_id = _job(client, 3002)
    pipe = client.pipeline()
    add_pending(pipe, job_id, {f"queued-{i}": [f"/d/{i}.png"] for i in range(3000)}, TTL)  # a backlog, just sent
    add_pending(pipe, job_id, {"taken": ["/d/taken.png"], "lost": ["/d/lost.png"]}, TTL)
    pipe.execute()
    old = time.time() - 60  # sent a minute ago: both should have been taken long since
    _date(client, job_id, "taken", old)
    _date(client, job_id, "lost", old)
    Leases(client, "live-worker", lease_ttl=30, key_ttl=TTL).begin("taken", job_id, ["/d/taken.png"])
    sent: list[tuple[str, list[str], str]] = []
    reconciler = Reconciler(client, "no-queue", lambda *a: sent.append(a), owner="me")
    client.config_resetstat()  # our own server (conftest): count the commands of one pass
    assert reconciler.lost() == {"lost"}
    assert sent == [(job_id, ["/d/lost.png"], "lost")]
    calls = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in client.info("commandstats").items()}
    # The backlog's 3,000 entries were never read: no HGETALL or HSCAN of the pending hash, one HMGET of the
    # unleased old one.
    assert not {"hgetall", "hscan", "hvals", "hkeys"} & set(calls), calls
    assert calls.get("hmget") == 1
    # The re-sent message is dated now in its entry and in the index: the next pass leaves it alone.
    score = client.zscore(keys.job_pending_times(job_id), "lost")
    assert score is not None and score > old + 50
    assert reconciler.lost() == set() and len(sent) == 1


def test_pending_entries_without_the_time_index_are_indexed_and_still_checked(client: redis.Redis) -> None:
    # Written by an older producer (the hash only), or dated again by an older worker: the check still finds
    # the lost one, and the index then holds every entry with its date.
    job_id = _job(client, 3)
    pipe = client.pipeline()
    add_pending(pipe, job_id, {"fresh": ["/d/a.png"], "redated": ["/d/b.png"]}, TTL)
    pipe.execute()
    client.hset(keys.job_pending(job_id), "old-producer", json.dumps({"paths": ["/d/c.png"], "at": time.time() - 60}))
    _date(client, job_id, "redated", time.time() - 60)  # index and entry agree: old
    _date(client, job_id, "redated", time.time(), index=False)  # the entry dated again since, the index not
    client.zadd(keys.job_pending_times(job_id), {"finished-elsewhere": time.time() - 60})  # no entry left
    sent: list[tuple[str, list[str], str]] = []
    reconciler = Reconciler(client, "no-queue", lambda *a: sent.append(a), owner="me")
    assert reconciler.lost() == {"old-producer"}
    assert sent == [(job_id, ["/d/c.png"], "old-producer")]
    index = dict(client.zrange(keys.job_pending_times(job_id), 0, -1, withscores=True))
    assert set(index) == {b"fresh", b"redated", b"old-producer"}  # the stale one dropped
    assert index[b"redated"] > time.time() - 30  # corrected to its entry's date
    assert 0 < client.ttl(keys.job_pending_times(job_id)) <= TTL


def test_only_old_unacknowledged_copies_are_read_and_those_of_done_or_resent_messages_dropped(
    client: redis.Redis,
) -> None:
    def deliver(tag: str, message_id: str, at: float) -> None:  # as kombu records a delivery (tag -> copy)
        copy = json.dumps([{"headers": {"id": message_id}, "body": ""}, "", "imgpipe"])
        client.hset("unacked", tag, copy)
        client.zadd("unacked_index", {tag: at})

    old, now = time.time() - 60, time.time()
    for i in range(2000):  # in flight at live workers, just delivered: never read
        deliver(f"live-{i}", f"m-live-{i}", now)
    client.hset(keys.deliveries("m-done"), "done", "1")
    deliver("dead-done", "m-done", old)  # a dead worker's copy of a message finished since
    deliver("dead-resent", "m-resent", old)  # one this pass re-sent
    deliver("slow", "m-slow", old)  # an old delivery still in work: kept
    deliver("fresh-done", "m-done", now)  # too young to judge: kept for a later pass
    client.hset("unacked", "acked-meanwhile", "x")  # index entry gone: not read
    client.zadd("unacked_index", {"index-only": old})  # entry gone (acknowledged meanwhile): skipped
    reconciler = Reconciler(client, "no-queue", lambda *a: None, owner="me")
    client.config_resetstat()
    assert reconciler.forget_unacked({"m-resent"}) == 2
    left = {k.decode() for k in client.hkeys("unacked")}
    assert {"dead-done", "dead-resent"}.isdisjoint(left) and {"slow", "fresh-done", "live-7"} <= left
    assert client.zscore("unacked_index", "dead-done") is None and client.zscore("unacked_index", "slow") is not None
    calls = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in client.info("commandstats").items()}
    assert "hscan" not in calls and "hgetall" not in calls and calls["hmget"] == 1, calls  # the old ones only


def test_leases_of_a_group_are_taken_in_one_call_with_copies_and_missing_jobs_told_apart(
    client: redis.Redis,
) -> None:
    job_id = _job(client, 3)
    other = _job(client, 1)
    pipe = client.pipeline()
    add_pending(pipe, job_id, {"m1": ["/d/a.png", "/d/b.png"]}, TTL)
    add_pending(pipe, other, {"m3": ["/d/c.png"]}, TTL)
    pipe.execute()
    assert client.zscore(keys.job_pending_times(job_id), "m1") is not None
    ResultStore(client, TTL).write(job_id, [ok_record("/d/b.png", [("7", 0.9)], MODEL)], MODEL)
    one = Leases(client, "worker-1", lease_ttl=30, key_ttl=TTL)
    got = one.begin_many(
        [
            ("m1", job_id, ["/d/a.png", "/d/b.png"]),
            ("m2", "no-such-job", ["/d/x.png"]),
            ("m1", job_id, ["/d/a.png", "/d/b.png"]),  # a second copy of m1 in the same group
            ("m3", other, ["/d/c.png"]),
            ("m4", job_id, []),
        ]
    )
    assert [b.state for b in got] == ["ok", "no_job", "duplicate", "ok", "ok"]
    assert got[0].todo == (0,) and got[3].todo == (0,) and got[4].todo == ()  # /d/b.png has its record
    assert one.held == {"m1", "m3", "m4"}
    assert Leases(client, "worker-2", 30, TTL).begin("m3", other, ["/d/c.png"]).state == "duplicate"
    one.working_many(["m1", "m3"])
    assert client.hget(keys.deliveries("m1"), "state") == b"working"
    pipe = client.pipeline(transaction=False)
    one.finish_many(pipe, [("m1", job_id), ("m3", other)])
    pipe.execute()
    assert one.held == {"m4"}
    assert client.zscore(keys.LEASES, "m1") is None and client.zscore(keys.LEASES, "m4") is not None
    assert client.hget(keys.deliveries("m1"), "done") == b"1" and client.hget(keys.deliveries("m1"), "owner") is None
    # Out of the pending hash and of the lost-message check's time index.
    assert client.hget(keys.job_pending(job_id), "m1") is None and client.hget(keys.job_pending(other), "m3") is None
    assert client.zcard(keys.job_pending_times(job_id)) == 0 and client.zcard(keys.job_pending_times(other)) == 0
    # A finished message's copy begins with nothing left to do; its count was never charged.
    again = Leases(client, "worker-2", 30, TTL).begin("m1", job_id, ["/d/a.png", "/d/b.png"])
    assert again.state == "ok" and again.count == 0
