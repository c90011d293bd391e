"""Idempotent result writes, delivery counting and dead letters, all in the job's Redis keys.

Each path's record is written once (HSETNX) and counted only when new, in one Lua script per message, so a
redelivered message never adds a second record or counts an image twice: ``done + failed == total`` exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from imgpipe import keys
from imgpipe.jobs import FINISH_IF_COMPLETE_LUA, as_text
from imgpipe.records import Record

# KEYS: job hash, results hash, dead-letter list.
# ARGV: ttl seconds, model id, dead-letter JSON ('' for none), then (path, record JSON, status) triples.
# Returns {1, i...} with the 0-based indices of the records written now, or {0} when the job does not exist.
_WRITE_LUA = (
    FINISH_IF_COMPLETE_LUA
    + """
local job, results = KEYS[1], KEYS[2]
if redis.call('EXISTS', job) == 0 then return {0} end
local written = {1}
local done, failed = 0, 0
for i = 4, #ARGV, 3 do
  if redis.call('HSETNX', results, ARGV[i], ARGV[i + 1]) == 1 then
    if ARGV[i + 2] == 'ok' then done = done + 1 else failed = failed + 1 end
    written[#written + 1] = (i - 4) / 3
  end
end
if done + failed > 0 then
  local now = now_string()
  if done > 0 then redis.call('HINCRBY', job, 'done', done) end
  if failed > 0 then redis.call('HINCRBY', job, 'failed', failed) end
  redis.call('HSETNX', job, 'started', now)
  redis.call('HSET', job, 'updated', now)
  redis.call('HSETNX', job, 'model', ARGV[2])
  redis.call('EXPIRE', job, ARGV[1])
  redis.call('EXPIRE', results, ARGV[1])
  if ARGV[3] ~= '' then redis.call('LPUSH', KEYS[3], ARGV[3]) end
  finish_if_complete(job, now)
end
return written
"""
)


@dataclass(frozen=True)
class Delivery:
    """What Redis says about one message as a worker starts it."""

    count: int  # this start included
    last_error: str | None  # why the previous start failed, if it said
    job_exists: bool
    todo: list[str]  # paths of the message that have no record yet


class ResultStore:
    """The worker's Redis side: one round trip to start a message, one Lua call to write its records."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds
        self._write = client.register_script(_WRITE_LUA)

    def begin(self, message_id: str, job_id: str, paths: Sequence[str]) -> Delivery:
        """Count this delivery of the message and find which of its paths still need a record."""
        key = keys.deliveries(message_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(key, "count", 1)
        pipe.hget(key, "error")
        pipe.expire(key, self.ttl_seconds)
        pipe.exists(keys.job(job_id))
        if paths:
            pipe.hmget(keys.job_results(job_id), list(paths))
        replies = pipe.execute()
        count, error, _, exists = replies[:4]
        existing = replies[4] if paths else []
        todo = [path for path, record in zip(paths, existing, strict=True) if record is None]
        return Delivery(int(count), as_text(error), bool(exists), todo)

    def note_failure(self, message_id: str, error: str) -> None:
        """Remember why this delivery failed: the dead-letter entry says so if the message never succeeds."""
        key = keys.deliveries(message_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, "error", error[:2000])
        pipe.expire(key, self.ttl_seconds)
        pipe.execute()

    def forget(self, message_id: str, job_id: str) -> None:
        """The message is complete (every path has a record): drop its delivery counter and pending entry."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(keys.deliveries(message_id))
        pipe.hdel(keys.job_pending(job_id), message_id)
        pipe.execute()

    def write(
        self,
        job_id: str,
        records: Sequence[Record],
        model: str,
        dead_letter: dict[str, Any] | None = None,
    ) -> list[Record] | None:
        """Write the records that are new (one per path, ever) and count them; returns those written.

        None when the job does not exist (expired, or never created): nothing is written. ``dead_letter``
        is pushed to the dead-letter list in the same step, if any record was new.
        """
        argv: list[Any] = [self.ttl_seconds, model, json.dumps(dead_letter) if dead_letter else ""]
        for record in records:
            argv += [record["path"], json.dumps(record, ensure_ascii=False), record["status"]]
        reply = self._write(keys=[keys.job(job_id), keys.job_results(job_id), keys.DEAD_LETTER], args=argv)
        if not reply or int(reply[0]) == 0:
            return None
        return [records[int(i)] for i in reply[1:]]
