"""Leases per message id and the reconciler that re-sends expired and lost messages (docs/reliability.md).

A worker takes a message's lease in the Lua call that begins it, renews it with its heartbeat, marks it
``working`` when its images enter decode and inference, and drops it once the message's records are written.
The reconciler (every worker runs it, one at a time; ``imgpipe reconcile JOB`` by hand) re-sends messages whose
lease expired and messages that exist nowhere (the queue's watermark has passed them).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from imgpipe import defaults, keys
from imgpipe.jobs import FINISH_IF_COMPLETE_LUA, as_text, is_cancelled, job_queue
from imgpipe.messages import SENT_HEADER
from imgpipe.untrusted import loads

log = logging.getLogger(__name__)

LOST = "the worker stopped while processing it alone (killed, crashed or lost its connection)"

# What happens to a lease that ends without success (expired, or its batch failed): a message that was working
# alone is charged one delivery; one that was working beside others becomes a suspect (it runs alone next
# time); a message only held (waiting for a work slot) is charged nothing.
_RULE_LUA = (
    """
local function now_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local LOST_TEXT = 'the worker stopped while processing it alone (killed, crashed or lost; its lease expired)'
local function end_lease(d, why)
  local v = redis.call('HMGET', d, 'state', 'alone', 'current')
  if v[1] == 'working' then
    if v[2] == '1' then
      redis.call('HINCRBY', d, 'count', 1)
      redis.call('HSET', d, 'error', why)
      if v[3] then redis.call('HSET', d, 'culprit', v[3]) end
    else
      redis.call('HSET', d, 'suspect', '1')
    end
  end
  redis.call('HDEL', d, 'owner', 'state', 'alone', 'current')
end
"""
    + FINISH_IF_COMPLETE_LUA
)

# Begins one message: job, results, deliveries hash, leases zset; message id, owner, lease ttl, job id, key ttl,
# its paths, the time and ``jobs`` (per job key, what this call read of it: {roots, cancelled, pin}, false when
# there is no job; a call reads each job once, however many of its messages it begins). Returns {0} (no job),
# {2} (leased by another live worker: a duplicate copy) or
# {1, count, error, suspect, roots JSON, culprit, cancelled, pin, recorded(0/1) per path}.
_BEGIN_ONE_LUA = (
    _RULE_LUA
    + """
local function begin_one(jk, rk, d, lk, mid, owner, lease_ttl, job_id, key_ttl, paths, now, jobs)
  local job = jobs[jk]
  if job == nil then
    job = redis.call('EXISTS', jk) == 1 and redis.call('HMGET', jk, 'roots', 'cancelled', 'pin')
    jobs[jk] = job
  end
  if not job then return {0} end
  local held_by = redis.call('HGET', d, 'owner')
  local expiry = redis.call('ZSCORE', lk, mid)
  if held_by and expiry and tonumber(expiry) > now then return {2} end
  if held_by then end_lease(d, LOST_TEXT) end
  redis.call('HSET', d, 'owner', owner, 'state', 'held', 'job', job_id)
  redis.call('EXPIRE', d, key_ttl)
  redis.call('ZADD', lk, now + tonumber(lease_ttl), mid)
  local v = redis.call('HMGET', d, 'count', 'error', 'suspect', 'culprit')
  local out = {1, v[1] or '0', v[2] or '', v[3] or '0', job[1] or '', v[4] or '', job[2] or '', job[3] or ''}
  for i = 1, #paths do out[#out + 1] = redis.call('HEXISTS', rk, paths[i]) end
  return out
end
"""
)

# Several messages at once. KEYS: leases zset. ARGV: owner, lease ttl, key ttl, then per message: message id,
# job id, job key, results key, deliveries key, path count, paths... Returns one begin_one reply per message.
BEGIN_MANY_LUA = (
    _BEGIN_ONE_LUA
    + """
local out, i, now, jobs = {}, 4, now_seconds(), {}
while i <= #ARGV do
  local n = tonumber(ARGV[i + 5])
  local paths = {}
  for j = 1, n do paths[j] = ARGV[i + 5 + j] end
  out[#out + 1] = begin_one(ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], KEYS[1], ARGV[i], ARGV[1], ARGV[2], ARGV[i + 1],
    ARGV[3], paths, now, jobs)
  i = i + 6 + n
end
return out
"""
)

# KEYS: leases zset. ARGV: done ttl, then (message id, deliveries key, pending key of its job, its pending time
# index) per message. Ends the leases of messages whose records are all written (see Leases.finish).
FINISH_MANY_LUA = """
for i = 2, #ARGV, 4 do
  local d = ARGV[i + 1]
  redis.call('HDEL', d, 'owner', 'state', 'alone', 'current', 'culprit', 'suspect', 'count', 'error')
  redis.call('HSET', d, 'done', '1')
  redis.call('EXPIRE', d, ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', ARGV[i + 2], ARGV[i])
  redis.call('ZREM', ARGV[i + 3], ARGV[i])
end
return 1
"""

# ARGV: alone ('1'/'0'), deliveries keys... Marks messages as working (what a crash then charges).
WORKING_MANY_LUA = """
for i = 2, #ARGV do redis.call('HSET', ARGV[i], 'state', 'working', 'alone', ARGV[1]) end
return 1
"""

# KEYS: leases zset, pending hash of the job, its time index. ARGV: message id, owner, failure text ('' : no
# failure), now, deliveries key. Ends this owner's lease (charging or marking a failure by the rule) and dates the
# pending entry now.
GIVE_BACK_LUA = (
    _RULE_LUA
    + """
local d = ARGV[5]
if redis.call('HGET', d, 'owner') ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' then end_lease(d, ARGV[3]) else redis.call('HDEL', d, 'owner', 'state', 'alone') end
redis.call('ZREM', KEYS[1], ARGV[1])
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if entry then
  local ok, decoded = pcall(cjson.decode, entry)
  if ok and type(decoded) == 'table' then
    decoded['at'] = tonumber(ARGV[4])
    redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(decoded))
    redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  end
end
return 1
"""
)

# KEYS: leases zset. ARGV: limit, deliveries key prefix. Ends every expired lease (by the rule) and returns
# {message id, job id, ...} of those ended.
EXPIRE_LUA = (
    _RULE_LUA
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_seconds(), 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, mid in ipairs(ids) do
  local d = ARGV[2] .. mid
  end_lease(d, LOST_TEXT)
  redis.call('ZREM', KEYS[1], mid)
  out[#out + 1] = mid
  out[#out + 1] = redis.call('HGET', d, 'job') or ''
end
return out
"""
)

# KEYS: leases zset. ARGV: lease ttl, message ids... Renews the expiry of leases that still exist.
RENEW_LUA = (
    _RULE_LUA
    + """
local expiry = now_seconds() + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
return 1
"""
)


@dataclass(frozen=True)
class Begun:
    """What Redis says about one message as a worker begins it."""

    state: str  # "ok", "no_job" or "duplicate"
    count: int = 0  # deliveries charged so far
    last_error: str | None = None
    suspect: bool = False  # runs alone: it was working beside others when its worker died or its batch failed
    roots: tuple[str, ...] | None = None  # the job's roots (None: not recorded)
    todo: tuple[int, ...] = ()  # indices of the message's paths that have no record yet
    culprit: str | None = None  # the path in work when it last failed alone (charged)
    cancelled: bool = False  # the job was cancelled (`imgpipe cancel`): acknowledge without work
    pin: str = ""  # the model the job is pinned to (name@sha12), "" for any


@functools.lru_cache(maxsize=64)
def job_roots(raw: bytes | str | None) -> tuple[str, ...] | None:
    """A job's roots from their JSON in the job hash (None: not recorded, or not a list); read once per job,
    not once per message (the messages of a job all carry the same text)."""
    text = as_text(raw)
    try:
        roots = loads(text) if text else None
    except ValueError:
        return None
    return tuple(str(r) for r in roots) if isinstance(roots, list) else None


def worker_id() -> str:
    return f"imgpipe-{os.getpid()}@{socket.gethostname()}"


class Leases:
    """A worker process's side of the leases: begin, working mark, renew, give back, finish."""

    def __init__(self, client: redis.Redis, owner: str, lease_ttl: float, key_ttl: int) -> None:
        self.client = client
        self.owner = owner
        self.lease_ttl = lease_ttl
        self.key_ttl = key_ttl
        self.held: set[str] = set()  # message ids whose lease this process holds
        self._begin_many = client.register_script(BEGIN_MANY_LUA)
        self._working_many = client.register_script(WORKING_MANY_LUA)
        self._give_back = client.register_script(GIVE_BACK_LUA)
        self._renew = client.register_script(RENEW_LUA)

    def begin(self, message_id: str, job_id: str, paths: Sequence[str]) -> Begun:
        return self.begin_many([(message_id, job_id, paths)])[0]

    def begin_many(self, messages: Sequence[tuple[str, str, Sequence[str]]]) -> list[Begun]:
        """Take the leases of several messages (message id, job id, paths) in one Lua call; one Begun each.

        A message whose lease this process holds already (or that appears twice here) is a duplicate."""
        args: list[Any] = [self.owner, self.lease_ttl, self.key_ttl]
        asked: list[bool] = []
        seen: set[str] = set()
        for message_id, job_id, paths in messages:
            fresh = message_id not in self.held and message_id not in seen
            seen.add(message_id)
            asked.append(fresh)
            if fresh:
                args += [message_id, job_id, keys.job(job_id), keys.job_results(job_id), keys.deliveries(message_id)]
                args += [len(paths), *paths]
        replies = iter(self._begin_many(keys=[keys.LEASES], args=args) if any(asked) else [])
        return [
            self._begun(message_id, next(replies)) if fresh else Begun("duplicate")
            for (message_id, _job, _paths), fresh in zip(messages, asked, strict=True)
        ]

    def _begun(self, message_id: str, reply: Any) -> Begun:
        code = int(reply[0])
        if code == 0:
            return Begun("no_job")
        if code == 2:
            return Begun("duplicate")
        self.held.add(message_id)
        return Begun(
            "ok",
            count=int(reply[1]),
            last_error=as_text(reply[2]) or None,
            suspect=as_text(reply[3]) == "1",
            roots=job_roots(reply[4]),
            culprit=as_text(reply[5]) or None,
            cancelled=is_cancelled(reply[6] or None),
            pin=as_text(reply[7]) or "",
            todo=tuple(i for i, recorded in enumerate(reply[8:]) if not int(recorded)),
        )

    def working(self, message_id: str, alone: bool) -> None:
        """Mark the message's images as entering decode and inference (what a crash now charges)."""
        self.working_many([message_id], alone)

    def working_many(self, message_ids: Sequence[str], alone: bool = False) -> None:
        """``working`` for several messages in one Lua call."""
        if message_ids:
            self._working_many(args=["1" if alone else "0", *(keys.deliveries(m) for m in message_ids)])

    def current(self, message_id: str, path: str) -> None:
        """A message running alone says which image is in work: a crash now names it the culprit."""
        self.client.hset(keys.deliveries(message_id), "current", path)

    def give_back(self, message_id: str, job_id: str, failure: str = "") -> None:
        """End this lease without success; ``failure`` applies the charging rule (empty: charge nothing)."""
        self.held.discard(message_id)
        self._give_back(
            keys=[keys.LEASES, keys.job_pending(job_id), keys.job_pending_times(job_id)],
            args=[message_id, self.owner, failure[:2000], time.time(), keys.deliveries(message_id)],
        )

    def finish(self, message_id: str, job_id: str) -> None:
        """Every path of the message has a record: drop its lease and pending entry, mark it done for a while
        (so that the reconciler can drop copies a dead worker left unacknowledged)."""
        pipe = self.client.pipeline(transaction=False)
        self.finish_many(pipe, [(message_id, job_id)])
        pipe.execute()

    def finish_many(self, pipe: Any, messages: Sequence[tuple[str, str]]) -> None:
        """``finish`` for several messages (message id, job id), queued on ``pipe`` (one FINISH_MANY_LUA call)."""
        args: list[Any] = [DONE_TTL_S]
        for message_id, job_id in messages:
            self.held.discard(message_id)
            args += [message_id, keys.deliveries(message_id), keys.job_pending(job_id), keys.job_pending_times(job_id)]
        if messages:
            pipe.eval(FINISH_MANY_LUA, 1, keys.LEASES, *args)  # the text, as ResultStore.queue_write does

    def release(self, message_id: str) -> None:
        """Forget a lease locally only (a duplicate or a message with no job)."""
        self.held.discard(message_id)

    def renew(self) -> None:
        """Push the expiry of every lease this process holds (called by the heartbeat)."""
        held = list(self.held)
        for start in range(0, len(held), 1000):
            self._renew(keys=[keys.LEASES], args=[self.lease_ttl, *held[start : start + 1000]])


# kombu's Redis transport's keys for messages taken and not yet acknowledged (all queues of the database).
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
# Seconds a finished message stays marked done (long enough for the reconciler to see a dead worker's copy).
DONE_TTL_S = 600

Resend = Callable[[str, list[str], str], None]  # (job id, paths, message id)
# Message ids the lost-message check reads from Redis at a time.
LOST_PAGE = 1000


def queue_watermark(client: redis.Redis, queue: str) -> float | None:
    """Send time of the oldest message still queued (the next to be taken); now when the queue is empty.

    None when the oldest message does not say when it was sent (a version 1 message): no lost-message check.
    """
    raw = client.lindex(queue, -1)
    if raw is None:
        return time.time()
    try:
        message = loads(raw)
        sent = message["headers"].get(SENT_HEADER)
        return float(sent) if sent is not None else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class Reconciler:
    """Re-sends messages whose lease expired and messages lost from the queue (one pass: ``run_once``)."""

    def __init__(
        self,
        client: redis.Redis,
        queue: str,
        resend: Resend,
        grace_s: float = defaults.LOST_GRACE_S,
        owner: str | None = None,
    ) -> None:
        self.client = client
        self.queue = queue
        self.resend = resend
        self.grace_s = grace_s
        self.owner = owner or worker_id()
        self._expire = client.register_script(EXPIRE_LUA)

    def run_once(self, job_id: str | None = None, lock_s: float | None = None) -> dict[str, int]:
        """One pass; with ``lock_s``, only if no other worker ran one in the last ``lock_s`` seconds."""
        if lock_s is not None and not self.client.set(
            keys.SWEEP_LOCK, self.owner, nx=True, px=max(1, int(lock_s * 1000))
        ):
            return {"expired": 0, "lost": 0}
        expired, lost = self.expired(), self.lost(job_id)
        # Every pass (not only one that re-sent something): a dead worker's copies of messages that are done
        # or were re-sent would otherwise wait in kombu's unacked set for the visibility timeout.
        self.forget_unacked(expired | lost)
        return {"expired": len(expired), "lost": len(lost)}

    def expired(self, limit: int = 1000) -> set[str]:
        reply = self._expire(keys=[keys.LEASES], args=[limit, keys.deliveries("")])
        resent: set[str] = set()
        for i in range(0, len(reply), 2):
            message_id, job_id = as_text(reply[i]) or "", as_text(reply[i + 1]) or ""
            if job_id and self._resend_pending(job_id, message_id):
                resent.add(message_id)
        if resent:
            log.warning("re-sent %d messages whose worker stopped (lease expired)", len(resent))
        return resent

    def forget_unacked(self, resent: set[str]) -> int:
        """Drop a dead worker's copies of re-sent or finished messages from kombu's unacknowledged set.

        Else kombu restores them after the visibility timeout (an hour by default), only for the lease check
        to drop them then. Racing kombu's own restore is harmless here: each was sent again or is done. Only
        copies delivered more than the grace before now are read (kombu's index dates each delivery): a dead
        worker's copy is older than that by the time its lease expires or its message counts as lost, and the
        live workers' deliveries in flight are not read and decoded every pass (with 20,000 in flight that was
        0.8 s of a worker's CPU every 2 s).
        """
        old = _older(self.client, KOMBU_UNACKED_INDEX, time.time() - self.grace_s)
        dropped = 0
        for start in range(0, len(old), LOST_PAGE):
            tags = old[start : start + LOST_PAGE]
            entries = []
            for tag, raw in zip(tags, self.client.hmget(KOMBU_UNACKED, tags), strict=True):
                if raw is None:  # acknowledged meanwhile
                    continue
                try:
                    entries.append((tag, str(loads(raw)[0]["headers"]["id"])))
                except (ValueError, KeyError, IndexError, TypeError):
                    continue
            pipe = self.client.pipeline(transaction=False)
            for _, message_id in entries:
                pipe.hget(keys.deliveries(message_id), "done")
            done = pipe.execute() if entries else []
            drop = [tag for (tag, mid), flag in zip(entries, done, strict=True) if mid in resent or flag == b"1"]
            if drop:
                pipe = self.client.pipeline(transaction=False)
                pipe.hdel(KOMBU_UNACKED, *drop)
                pipe.zrem(KOMBU_UNACKED_INDEX, *drop)
                pipe.execute()
                dropped += len(drop)
        return dropped

    def lost(self, job_id: str | None = None) -> set[str]:
        watermarks: dict[str, float | None] = {}  # per queue: a pinned job's messages wait in its model's queue
        jobs = [job_id] if job_id else [as_text(j) or "" for j in self.client.smembers(keys.PENDING_JOBS)]
        resent: set[str] = set()
        for job in jobs:
            queue = job_queue(self.client, job, self.queue)
            if queue not in watermarks:
                watermarks[queue] = queue_watermark(self.client, queue)
            watermark = watermarks[queue]
            if watermark is None:
                continue
            pending, times = keys.job_pending(job), keys.job_pending_times(job)
            if not self.client.hlen(pending):
                if not job_id:
                    self.client.srem(keys.PENDING_JOBS, job)
                self.client.delete(times)
                continue
            cutoff = watermark - self.grace_s
            resent |= self._resend_unleased(job, cutoff)
            # Entries missing from the index (written by an older producer or worker; the pass above dropped the
            # index's stale ones, so the counts tell): indexed, then checked.
            if self.client.hlen(pending) > self.client.zcard(times):
                self._index(job)
                resent |= self._resend_unleased(job, cutoff)
            if not self.client.exists(keys.job(job)):
                self.client.delete(pending, times)
        if resent:
            log.warning("re-sent %d messages lost from the queue", len(resent))
        return resent

    def _resend_unleased(self, job_id: str, cutoff: float) -> set[str]:
        """Re-send the job's pending messages dated before ``cutoff`` that hold no lease; their ids."""
        return {m for m, entry in self._unleased_before(job_id, cutoff) if self._resend_entry(job_id, m, entry)}

    def _unleased_before(self, job_id: str, cutoff: float) -> Iterator[tuple[str, dict[str, Any]]]:
        """Pending messages of a job sent (or re-sent) before ``cutoff`` that hold no lease: (id, entry).

        Reads the job's time index up to the cutoff, so a pass costs the messages in flight and those lost, not
        the job's whole backlog (a pass read and decoded every pending entry: 0.8 s of a worker's CPU every 2 s
        for a job with 100,000 messages queued). Index entries without a pending entry are dropped, and those
        older than their entry (dated again by a worker that does not keep the index) are corrected."""
        pending, times = keys.job_pending(job_id), keys.job_pending_times(job_id)
        ids = [as_text(m) or "" for m in _older(self.client, times, cutoff)]
        for start in range(0, len(ids), LOST_PAGE):
            page = ids[start : start + LOST_PAGE]
            unleased = [
                m for m, score in zip(page, self.client.zmscore(keys.LEASES, page), strict=True) if score is None
            ]
            if not unleased:
                continue
            stale: list[str] = []
            later: dict[str | bytes, float] = {}
            for message_id, raw in zip(unleased, self.client.hmget(pending, unleased), strict=True):
                entry = _entry(raw)
                if entry is None:
                    stale.append(message_id)
                elif float(entry.get("at", 0)) > cutoff:
                    later[message_id] = float(entry["at"])
                else:
                    yield message_id, entry
            if stale:
                self.client.zrem(times, *stale)
            if later:
                self.client.zadd(times, later)

    def _index(self, job_id: str) -> None:
        """Add a job's pending entries missing from its time index (NX: an entry dated since is left alone)."""
        pending, times = keys.job_pending(job_id), keys.job_pending_times(job_id)
        batch: dict[str | bytes, float] = {}
        for message_id, raw in self.client.hscan_iter(pending, count=LOST_PAGE):
            entry = _entry(raw)
            batch[as_text(message_id) or ""] = float(entry.get("at", 0)) if entry else 0.0
            if len(batch) >= LOST_PAGE:
                self.client.zadd(times, batch, nx=True)
                batch = {}
        if batch:
            self.client.zadd(times, batch, nx=True)
        ttl = self.client.pttl(pending)
        if ttl > 0:
            self.client.pexpire(times, ttl)

    def _resend_pending(self, job_id: str, message_id: str) -> bool:
        entry = _entry(self.client.hget(keys.job_pending(job_id), message_id))
        return entry is not None and self._resend_entry(job_id, message_id, entry)

    def _resend_entry(self, job_id: str, message_id: str, entry: dict[str, Any]) -> bool:
        paths = entry.get("paths")
        if not isinstance(paths, list):
            return False
        entry["at"] = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(keys.job_pending(job_id), message_id, json.dumps(entry))
        pipe.zadd(keys.job_pending_times(job_id), {message_id: entry["at"]})
        pipe.execute()
        self.resend(job_id, [str(p) for p in paths], message_id)
        return True


def _older(client: redis.Redis, key: str, cutoff: float) -> list[bytes]:
    """Members of sorted set ``key`` scored up to ``cutoff``, in pages, read whole before the caller changes
    anything (a re-send or a removal would move the pages)."""
    members: list[bytes] = []
    while True:
        page = client.zrangebyscore(key, "-inf", cutoff, start=len(members), num=LOST_PAGE)
        members += page
        if len(page) < LOST_PAGE:
            return members


def _entry(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        entry = loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None
