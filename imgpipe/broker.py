"""Celery broker settings shared by producers and workers: JSON only, one queue, Redis transport options."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import socket
import ssl
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis
from celery import Celery
from kombu import Queue

from imgpipe import defaults, keys
from imgpipe.errors import ConfigError
from imgpipe.messages import PATHS_HEADER, SENT_HEADER, VERSION, VERSION_HEADER
from imgpipe.settings import RedisSettings

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def safe_url(url: str) -> str:
    """The Redis URL as given, for messages and logs, with a password masked only where there is one
    (``redis://:**@host``; a ``password=`` query option too); nothing else changes."""
    parts = urlsplit(url)
    masked = url
    if parts.password:
        userinfo, _, host = parts.netloc.rpartition("@")
        masked = masked.replace(parts.netloc, f"{userinfo.partition(':')[0]}:**@{host}", 1)
    if parts.query:
        query = "&".join(
            f"{key}=**" if key.lower() == "password" and value else f"{key}={value}" if value else key
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
        )
        masked = masked.rpartition("?")[0] + "?" + query
    return masked


def ssl_options(url: str) -> dict[str, Any] | None:
    """TLS options of a ``rediss://`` URL, from the query string redis-py also reads; None for ``redis://``.

    Certificates are verified unless the URL says ``ssl_cert_reqs=none``; ``ssl_ca_certs``, ``ssl_certfile``
    and ``ssl_keyfile`` name a private CA and a client certificate.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = dict(parse_qsl(parts.query))
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise ConfigError(f"{safe_url(url)}: ssl_cert_reqs={reqs!r}; valid: {', '.join(_CERT_REQS)}")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[reqs]}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query:
            options[key] = query[key]
    return options


def redis_client(settings: RedisSettings, *, check: bool = True, max_connections: int | None = None) -> redis.Redis:
    """A redis-py client for ``settings.url`` (passwords, ``rediss://`` and its ssl_* query options work).

    ``max_connections`` sizes the pool (a worker: above its task threads). With ``check``, one PING: a wrong
    URL, password or certificate is a ConfigError naming the (masked) URL.
    """
    try:
        extra: dict[str, Any] = {} if max_connections is None else {"max_connections": max_connections}
        client = redis.Redis.from_url(
            settings.url,
            socket_connect_timeout=10,
            socket_timeout=settings.socket_timeout,
            socket_keepalive=True,
            health_check_interval=30,
            **extra,
        )
    except ValueError as exc:
        raise ConfigError(f"IMGPIPE_REDIS_URL {safe_url(settings.url)!r} is not a Redis URL: {exc}") from None
    if check:
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            client.close()
            raise ConfigError(f"cannot use Redis at {safe_url(settings.url)}: {exc}") from None
    return client


def transport_options(redis: RedisSettings) -> dict[str, Any]:
    """kombu Redis transport options: the visibility timeout, a sweep for abandoned messages to match, and
    socket timeouts (kombu passes none to redis-py by default: a connection whose peer vanished without closing
    held the consumer's commands, a give-back among them, forever)."""
    timeout = redis.visibility_timeout
    return {
        "socket_timeout": redis.socket_timeout,
        "socket_connect_timeout": redis.socket_timeout,
        "socket_keepalive": True,
        # kombu drops a BRPOP connection whose reply is overdue by this much past its 1 s server-side timeout
        # (checked as often): about 2 x this to recover from a silent connection (51 s at kombu's default 25).
        "health_check_interval": max(1, min(25, redis.socket_timeout)),
        "visibility_timeout": timeout,
        # kombu looks for messages of dead workers every interval x throttle seconds (100 s by default);
        # scan a few times per visibility timeout instead, so they come back soon after it expires.
        "unacked_restore_interval": max(1, min(10, timeout // 3)),
        "unacked_restore_throttle": 1,
        # A worker killed while it held the restore lock blocks every other sweep until the lock expires
        # (300 s by default): keep that within the visibility timeout.
        "unacked_mutex_expire": max(5, min(300, timeout)),
    }


def task_time_limit(redis: RedisSettings) -> float:
    """Seconds one message may take: below the visibility timeout, so Redis never redelivers a live one."""
    return max(1.0, redis.visibility_timeout * defaults.TASK_TIME_LIMIT_FRACTION)


def celery_config(redis: RedisSettings) -> dict[str, Any]:
    """The settings both sides must agree on; workers add theirs in ``worker/app.py``."""
    return {
        "broker_url": redis.url,
        "broker_use_ssl": ssl_options(redis.url),
        "broker_transport_options": transport_options(redis),
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickle message is refused before it is decoded (pickle can run code).
        "accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        # Records go to the job's Redis hash, so Celery keeps no results.
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_queue": redis.queue,
        "task_queues": [Queue(redis.queue, routing_key=redis.queue)],
        "task_routes": {keys.TASK_CLASSIFY: {"queue": redis.queue}},
    }


def make_celery(main: str, redis: RedisSettings) -> Celery:
    """A Celery app for ``redis``; it registers no tasks and imports nothing of the worker."""
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(redis))
    return app


def publish(
    app: Celery, job_id: str, paths: list[str], message_id: str, producer: Any = None, queue: str | None = None
) -> None:
    """Send one ``imgpipe.classify_chunk`` message (args: job id, paths in their text form) by task name, to
    ``queue`` (a pinned job's model queue, imgpipe.jobs.job_queue) or the default queue.

    The message format is version ``imgpipe.messages.VERSION`` (docs/reliability.md).
    """
    app.send_task(
        keys.TASK_CLASSIFY,
        args=[job_id, paths],
        task_id=message_id,
        producer=producer,
        queue=queue,
        argsrepr=_argsrepr(job_id, paths),
        kwargsrepr="{}",
        headers={VERSION_HEADER: VERSION, SENT_HEADER: time.time(), PATHS_HEADER: len(paths)},
    )


def _argsrepr(job_id: str, paths: list[str]) -> str:
    """A short summary of a message's arguments instead of Celery's repr of every path (which cost more than the
    publish itself)."""
    return f"[{job_id!r}, <{len(paths)} paths: {paths[0]!r}...>]" if paths else repr([job_id, paths])


# Protocol 2's third body element (no canvas).
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_EMBED_JSON = json.dumps(_EMBED)
# A string as json.dumps writes it (ASCII, quoted): the C encoder json.dumps itself calls.
_json_text = json.encoder.encode_basestring_ascii
# Placeholders of the envelope template, as json.dumps writes them ("\u0001id\u0001"); ``_template`` checks
# that it finds exactly those it placed (an origin or queue name holding one would be refused there).
_SLOT = re.compile(r'"\\u0001(\w+)\\u0001"')
_SLOTS = 9  # id 3 times, argsrepr twice, sent, paths, body, tag


def _slot(name: str) -> str:
    return f"\x01{name}\x01"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}  # RFC 4122 variant bits


def uuid4_text() -> str:
    """A random (version 4) UUID in its text form, as ``str(uuid.uuid4())`` writes it, at a third of the cost
    (kombu's delivery tags are these)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


class Envelopes:
    """The text ``publish`` puts in a Redis queue, built directly: a Celery task message (protocol 2) in kombu's
    Redis envelope, field for field what ``app.send_task`` and kombu's Redis transport write (a test compares
    them), at a twenty-fifth of the cost (``send_task`` took ~150 us of the producer's CPU per message: a watched
    folder or `enqueue --chunk-size 1` spent most of its time there). The Enqueuer pushes these with LPUSH in
    the same pipeline that raises the job's total, on the queue's priority-0 list (kombu's name for it is the
    queue's own).

    The envelope is serialised once per queue with placeholders; each message fills in its ids, times and
    texts, each encoded as ``json.dumps`` would (6 us a message instead of 22 with ``json.dumps`` of the
    whole envelope each time)."""

    def __init__(self) -> None:
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self.reply_to = str(uuid.uuid4())
        self._templates: dict[str, str] = {}

    def text(self, job_id: str, paths: list[str], message_id: str, queue: str) -> str:
        args = ", ".join(map(_json_text, paths))
        body = f"[[{_json_text(job_id)}, [{args}]], {{}}, {_EMBED_JSON}]"
        template = self._templates.get(queue) or self._template(queue)
        return template.format(
            id=_json_text(message_id),
            argsrepr=_json_text(_argsrepr(job_id, paths)),
            sent=repr(time.time()),  # float.__repr__, as json.dumps writes a float
            paths=len(paths),
            body=base64.b64encode(body.encode()).decode(),
            tag=uuid4_text(),
        )

    def _template(self, queue: str) -> str:
        """The envelope for ``queue`` as json.dumps writes it, as a ``str.format`` template: its placeholders
        are fields, its other braces doubled."""
        headers: dict[str, Any] = {  # in Celery's order
            "lang": "py",
            "task": keys.TASK_CLASSIFY,
            "id": _slot("id"),
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": _slot("id"),
            "parent_id": None,
            "argsrepr": _slot("argsrepr"),
            "kwargsrepr": "{}",
            "origin": self.origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
            VERSION_HEADER: VERSION,
            SENT_HEADER: _slot("sent"),
            PATHS_HEADER: _slot("paths"),
        }
        text = json.dumps(
            {
                "body": _slot("body"),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": {
                    "correlation_id": _slot("id"),
                    "reply_to": self.reply_to,
                    "argsrepr": _slot("argsrepr"),
                    "kwargsrepr": "{}",
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": _slot("tag"),
                },
            }
        )
        parts = _SLOT.split(text)
        if len(parts) != 2 * _SLOTS + 1:
            raise ConfigError(f"queue name {queue!r} or host name {self.origin!r} cannot be used in a message")
        literal = [part.replace("{", "{{").replace("}", "}}") for part in parts[::2]]
        fields = [f'"{{{name}}}"' if name in ("body", "tag") else f"{{{name}}}" for name in parts[1::2]]
        template = "".join(x for pair in itertools.zip_longest(literal, fields, fillvalue="") for x in pair)
        self._templates[queue] = template
        return template
