"""Dead letters: list, replay and purge (``imgpipe dlq``), and their expiry with their job.

Entries live in the list ``imgpipe:deadletter`` (JSON: job, message_id, paths, reason, deliveries, at). An entry
whose job has expired from Redis is dropped whenever the list is read, so dead letters expire with their job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from imgpipe import keys
from imgpipe.jobs import add_pending
from imgpipe.untrusted import loads

# KEYS: job, results. ARGV: paths... Removes the dead_letter records of these paths, uncounts them and reopens
# the job; returns how many were removed.
_REOPEN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local removed = 0
for i = 1, #ARGV do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local ok, record = pcall(cjson.decode, raw)
    if ok and type(record) == 'table' and record['reason'] == 'dead_letter' then
      redis.call('HDEL', KEYS[2], ARGV[i])
      removed = removed + 1
    end
  end
end
if removed > 0 then
  redis.call('HINCRBY', KEYS[1], 'failed', -removed)
  redis.call('HDEL', KEYS[1], 'finished')
end
return removed
"""

Entry = dict[str, Any]


def entries(client: redis.Redis, job_id: str | None = None) -> list[tuple[bytes, Entry]]:
    """Dead letters (raw value, entry), oldest first, of one job or all; drops those of expired jobs."""
    found = []
    for raw in reversed(client.lrange(keys.DEAD_LETTER, 0, -1)):
        try:
            entry = loads(raw)
            job = str(entry["job"])
        except (ValueError, KeyError, TypeError):
            client.lrem(keys.DEAD_LETTER, 1, raw)
            continue
        if not client.exists(keys.job(job)):
            client.lrem(keys.DEAD_LETTER, 1, raw)  # expired with its job
            continue
        if job_id is None or job == job_id:
            found.append((raw, entry))
    return found


def purge(client: redis.Redis, job_id: str | None = None) -> int:
    """Remove dead letters (of one job or all); their images keep their dead_letter records."""
    removed = 0
    for raw, _ in entries(client, job_id):
        removed += int(client.lrem(keys.DEAD_LETTER, 1, raw))
    return removed


def replay(
    client: redis.Redis,
    send: Callable[[str, list[str], str], None],
    ttl_seconds: int,
    job_id: str | None = None,
) -> tuple[int, int]:
    """Send dead letters again with a fresh delivery count: their dead_letter records are removed (and
    uncounted) first, so each image gets its one record anew. Returns (messages, images) sent."""
    reopen = client.register_script(_REOPEN_LUA)
    messages = images = 0
    for raw, entry in entries(client, job_id):
        job, message_id, paths = str(entry["job"]), str(entry["message_id"]), [str(p) for p in entry["paths"]]
        removed = int(reopen(keys=[keys.job(job), keys.job_results(job)], args=paths))
        client.lrem(keys.DEAD_LETTER, 1, raw)
        if removed <= 0:
            continue
        pipe = client.pipeline(transaction=False)
        pipe.delete(keys.deliveries(message_id))
        pipe.expire(keys.job(job), ttl_seconds)
        add_pending(pipe, job, {message_id: paths}, ttl_seconds)
        pipe.execute()
        send(job, paths, message_id)
        messages += 1
        images += removed
    return messages, images
