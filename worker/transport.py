"""kombu's Redis transport with a gate: anything in the queue that is not an imgpipe message is dropped there.

A raw ``LPUSH imgpipe hello`` (not JSON), a JSON value that is not a kombu message, a message in another
content type (pickle) or for another task is logged, counted in ``imgpipe_messages_refused_total{reason}`` and
dropped (BRPOP has already taken it off the queue), and the worker keeps serving. Registered for the worker
process only (``install``), under the ``redis`` and ``rediss`` schemes.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from imgpipe import keys
from imgpipe.untrusted import loads
from imgpipe.worker import metrics

log = logging.getLogger(__name__)


def refuse(reason: str, detail: str) -> None:
    metrics.REFUSED.labels(reason=reason).inc()
    log.error("refused a message (%s): %s; dropped", reason, detail[:300])


def check_payload(payload: Any) -> str | None:
    """Why a decoded queue item is not an imgpipe message (the refusal reason), or None.

    Everything kombu reads from the envelope before imgpipe sees the message is checked here, so that no item
    can stop the consumer: a body kombu cannot decode (a body encoding other than base64, a body that is not
    base64 text, a content encoding other than UTF-8), a delivery tag or route that is not text, a priority
    that is not a small integer (each of these stopped the worker's consumer with an exception inside kombu)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
        return "junk"
    properties, headers, body = payload["properties"], payload.get("headers", {}), payload.get("body")
    if not isinstance(headers, dict) or not isinstance(body, str):
        return "junk"
    info = properties.get("delivery_info")
    if not isinstance(properties.get("delivery_tag"), str) or not isinstance(info, dict):
        return "junk"
    if not isinstance(info.get("exchange"), str) or not isinstance(info.get("routing_key"), str):
        return "junk"
    priority = properties.get("priority", 0)
    if priority is not None and (type(priority) is not int or not 0 <= priority <= 255):
        return "junk"
    if payload.get("content-type") != "application/json":
        return "content_type"
    if payload.get("content-encoding", "utf-8") not in ("utf-8", "utf8"):
        return "content_type"
    if properties.get("body_encoding") != "base64" or not _is_base64(body):
        return "junk"
    if headers.get("task") != keys.TASK_CLASSIFY:
        return "unknown_task"
    return None


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        return False
    return True


def _describe(message: Any, reason: str) -> str:
    if reason == "content_type":
        kind, encoding = message.get("content-type"), message.get("content-encoding", "utf-8")
        return f"content type {kind!r}, encoding {encoding!r} (only application/json in UTF-8 is accepted)"
    if reason == "unknown_task":
        return f"task {message.get('headers', {}).get('task')!r}"
    return repr(message)[:200]


# Records ARGV[5] (the message BRPOP just returned, if given) and takes up to ARGV[1] more messages from the list
# KEYS[1], each recorded as delivered and unacknowledged in kombu's own format (KEYS[2]: its unacked hash, tag ->
# [message, exchange, routing key]; KEYS[3]: its index, tag -> ARGV[2], the time), all in one step; returns
# {tag, raw message, ..., left} in that order (tag: its delivery tag if recorded; '': not a kombu message, taken off
# the queue only, for the gate to refuse; left: the messages still in the queue, the backlog the worker's hold
# reads). The raw text is kept as sent (re-encoding it with cjson would turn empty JSON arrays into objects).
#
# Images bound: ARGV[3] images may still be held (negative: no bound). Each message counts the paths its
# imgpipe_paths header says (imgpipe's producers write it; at least 1), or ARGV[4] (the worker's recent paths per
# message) without one: a hint only, the body is what the worker counts once it has the message. A message that
# would go past the bound is pushed back where it was (RPUSH: the next one taken) and the take ends, so a worker
# that has just served one-path messages does not take a whole chunked job at its one-path estimate while the
# other workers idle. The first message is always taken.
TAKE_LUA = """
local out = {}
local room, estimate = tonumber(ARGV[3]), tonumber(ARGV[4])
local bounded = room >= 0
local function weigh(raw)
  local ok, m = pcall(cjson.decode, raw)
  if not ok or type(m) ~= 'table' then return nil, 1 end
  local n = type(m['headers']) == 'table' and tonumber(m['headers']['imgpipe_paths'])
  if not n or n ~= n then return m, estimate end
  return m, math.max(1, math.floor(n))
end
local function record(raw, m)
  local tag, info
  if type(m) == 'table' and type(m['properties']) == 'table' then
    tag, info = m['properties']['delivery_tag'], m['properties']['delivery_info']
  end
  if type(tag) == 'string' and type(info) == 'table' and type(info['exchange']) == 'string'
      and type(info['routing_key']) == 'string' then
    redis.call('ZADD', KEYS[3], ARGV[2], tag)
    redis.call('HSET', KEYS[2], tag,
      '[' .. raw .. ', ' .. cjson.encode(info['exchange']) .. ', ' .. cjson.encode(info['routing_key']) .. ']')
    out[#out + 1] = tag
  else
    out[#out + 1] = ''
  end
  out[#out + 1] = raw
end
if ARGV[5] then
  local m, n = weigh(ARGV[5])
  record(ARGV[5], m)
  room = room - n
end
for _ = 1, tonumber(ARGV[1]) do
  if bounded and room < 1 and #out > 0 then break end
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  local m, n = weigh(raw)
  if bounded and n > room and #out > 0 then
    redis.call('RPUSH', KEYS[1], raw)
    break
  end
  record(raw, m)
  room = room - n
end
out[#out + 1] = redis.call('LLEN', KEYS[1])
return out
"""
# Most messages taken in one step after a BRPOP (within the prefetch count).
TAKE_MAX = 64


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, except that deliveries already recorded as unacknowledged by ``TAKE_LUA`` are only
    tracked locally (no second round trip each), and that the worker's images held bound the fetch as well as
    the prefetch count (``hold_by``)."""

    # Messages the worker may take now by the images it holds (``Runner.room``); None: the prefetch count only.
    images_room: Callable[[], int] | None = None
    # (images it may still take, paths per message to assume without a header) (``Runner.images_left``).
    images_left: Callable[[], tuple[int, float]] | None = None
    # Told the messages left in the queue after each take (``Runner.saw_backlog``); None: nobody asks.
    backlog: Callable[[int], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def can_consume(self) -> bool:
        """kombu asks before each fetch (BRPOP): the prefetch count and the images held both allow one."""
        room = QoS.images_room
        return super().can_consume() and (room is None or room() > 0)

    def room(self) -> int:
        """Deliveries the prefetch count still allows (TAKE_LUA bounds them by images, ``images_left``)."""
        room = TAKE_MAX
        if self.prefetch_count:
            room = max(0, self.prefetch_count - (len(self._delivered) - len(self._dirty)))
        return room


class Channel(kombu_redis.Channel):
    QoS = QoS
    _take: Any = None  # TAKE_LUA, registered on first use
    _take_client: Any = None  # the client it runs on (one per pool: kombu builds a new client per acquire)

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's BRPOP read (one message), then, in one TAKE_LUA step, that message recorded as unacknowledged
        and as many more taken as the room allows: a worker taking one-path messages pays a BRPOP and one Lua
        call for a run of messages, not a BRPOP and a MULTI/EXEC for each."""
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # as kombu: reconnect on the next iteration
                raise
            if not reply:
                raise Empty()
            key, item = bytes_to_str(reply[0]), reply[1]
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's own reset (annotated bool there)
            flush: Any = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()
        self._take_with(key, dest, item)
        return True

    def _deliver_raw(self, item: Any, dest: str, recorded: Any = b"") -> None:
        """Deliver one raw queue item; ``recorded``: the delivery tag under which TAKE_LUA has recorded it as
        unacknowledged already (empty: not recorded)."""
        try:
            # The standard library's decoder: kombu's adds an object hook per dict for its typed values
            # ({"__type__": ...}), which no imgpipe message holds (a tenth of a one-path message's cost).
            payload = loads(item)
        except ValueError as exc:  # not JSON, not UTF-8, nested too deep: refused here
            refuse("junk", f"not a JSON message: {exc.__class__.__name__}: {str(exc)[:200]}")
            if recorded:  # Redis's cjson read it, Python's json does not: kombu would restore it forever
                self.qos._remove_from_indices(recorded).execute()
            return
        if recorded:
            self.qos.recorded.add(str(payload["properties"]["delivery_tag"]))
        self.connection._deliver(payload, dest)

    def _take_with(self, key: str, dest: str, first: Any) -> None:
        """Record ``first`` (taken by BRPOP) and take more within the room (it counts ``first``); deliver them in
        order. If the step fails, ``first`` is delivered the kombu way (its QoS records it, or the error stops
        the consumer as it would have)."""
        qos = self.qos
        more = max(0, min(TAKE_MAX, qos.room()) - 1) if isinstance(qos, QoS) else 0
        images, estimate = QoS.images_left() if QoS.images_left is not None else (-1, 1.0)
        try:
            client = self._take_client
            if client is None or client.connection_pool is not self.pool:
                client = self._take_client = self._create_client()
            if self._take is None:
                self._take = client.register_script(TAKE_LUA)
            reply = self._take(
                keys=[key, qos.unacked_key, qos.unacked_index_key],
                args=[more, time.time(), images, estimate, first],
                client=client,
            )
        except Exception as exc:  # Redis failed: messages it took meanwhile come back with the visibility timeout
            log.warning("recording a delivery failed (%s); recording it the kombu way", exc)
            self._deliver_raw(first, dest)
            return
        taken, left = reply[:-1], reply[-1]
        if QoS.backlog is not None:
            QoS.backlog(int(left))  # before the deliveries: their room is reckoned with it
        for i in range(0, len(taken), 2):
            self._deliver_raw(taken[i + 1], dest, recorded=taken[i])


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        reason = check_payload(message)
        if reason is not None:
            refuse(reason, _describe(message, reason))
            self._forget(message)
            return
        super()._deliver(message, queue)

    def _forget(self, message: Any) -> None:
        """A refused message that ``TAKE_LUA`` recorded as unacknowledged: drop that record too."""
        try:
            tag = message["properties"]["delivery_tag"]
        except (TypeError, KeyError):
            return
        for channel in self.channels:
            qos = getattr(channel, "_qos", None)
            if isinstance(qos, QoS) and tag in qos.recorded:
                qos.recorded.discard(tag)
                qos._remove_from_indices(tag).execute()


def hold_by(
    room: Callable[[], int] | None,
    backlog: Callable[[int], None] | None = None,
    images_left: Callable[[], tuple[int, float]] | None = None,
) -> None:
    """Fetch only while ``room()`` > 0 (``Runner.room``) and within the prefetch count, take no more images than
    ``images_left()`` allows (``Runner.images_left``), and tell ``backlog`` how many messages each take left in
    the queue (``Runner.saw_backlog``)."""
    QoS.images_room = room
    QoS.backlog = backlog
    QoS.images_left = images_left


def install() -> None:
    """Make ``redis://`` and ``rediss://`` use this transport in this process (the worker)."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["rediss"] = f"{__name__}:Transport"
