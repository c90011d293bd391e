"""Idempotent result writes and dead letters, all in the job's Redis keys.

Each path's record is written once (HSETNX) and counted only when new, in one Lua script per message, so a
redelivered message never adds a second record or counts an image twice: ``done + failed == total`` exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import redis

from imgpipe import keys
from imgpipe.jobs import FINISH_IF_COMPLETE_LUA
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


class ResultStore:
    """The worker's Redis side for records: one Lua call writes a message's records (leases: imgpipe/leases.py)."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds

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
        pipe = self.client.pipeline(transaction=False)
        read = self.queue_write(pipe, job_id, records, model, dead_letter)
        return read(pipe.execute()[0])

    def queue_write(
        self,
        pipe: Any,
        job_id: str,
        records: Sequence[Record],
        model: str,
        dead_letter: dict[str, Any] | None = None,
    ) -> Callable[[Any], list[Record] | None]:
        """``write`` queued on a pipeline (several messages' writes in one round trip): returns the function
        that turns this write's reply, once the pipeline has run, into the records written (or None)."""
        argv: list[Any] = [self.ttl_seconds, model, json.dumps(dead_letter) if dead_letter else ""]
        for record in records:
            argv += [record["path"], json.dumps(record, ensure_ascii=False), record["status"]]
        # EVAL with the text, not a registered script: redis-py checks a pipeline's registered scripts with a
        # SCRIPT EXISTS round trip before every execute (a group's write paid two round trips), and an EVALSHA
        # failing after a Redis restart would not stop the acknowledgements queued beside it.
        pipe.eval(_WRITE_LUA, 3, keys.job(job_id), keys.job_results(job_id), keys.DEAD_LETTER, *argv)

        def read(reply: Any) -> list[Record] | None:
            if not reply or int(reply[0]) == 0:
                return None
            return [records[int(i)] for i in reply[1:]]

        return read
