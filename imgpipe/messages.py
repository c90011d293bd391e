"""The message format (versioned, JSON only) and the one text form of a path (lossless, valid UTF-8).

See docs/reliability.md. A message is the Celery task ``imgpipe.classify_chunk`` with args ``[job_id, paths]``
and the header ``imgpipe_v``; version 1 (no header) carries plain paths, version 2 escaped ones. ``parse``
validates a message before the worker writes anything to Redis.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imgpipe import defaults
from imgpipe.jobs import JOB_ID_PATTERN
from imgpipe.paths import native_path, path_bytes, path_text

__all__ = ["Limits", "Message", "Refused", "check_path", "native_path", "parse", "path_bytes", "path_text"]

# The format producers send now; workers accept every version in ACCEPTED.
VERSION = 2
ACCEPTED = (1, 2)
# Celery message header carrying the version (absent: version 1).
VERSION_HEADER = "imgpipe_v"
# Celery message header with the epoch seconds it was sent at (the reconciler's queue watermark).
SENT_HEADER = "imgpipe_sent"
# Celery message header with the number of paths the message carries: a worker's transport reads it to take
# no more images than it may hold (worker/transport.py TAKE_LUA); a hint only, the body is what counts.
PATHS_HEADER = "imgpipe_paths"


class Refused(Exception):
    """A message the worker will not run: ``reason`` is the bounded label of the refused-messages metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_paths: int = defaults.MAX_MESSAGE_PATHS
    max_bytes: int = defaults.MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class Message:
    """A validated message: its paths in the escaped text form, whatever version it came in."""

    job_id: str
    paths: list[str]
    version: int


def parse(args: Sequence[Any], kwargs: Mapping[str, Any], version: Any, limits: Limits = Limits()) -> Message:
    """Validate one message (before any Redis write); raises Refused."""
    if version is None:
        version = 1
    if not isinstance(version, int) or isinstance(version, bool) or version not in ACCEPTED:
        raise Refused("version", f"message format version {version!r}; this worker reads {list(ACCEPTED)}")
    if kwargs or len(args) != 2:
        raise Refused("schema", "expected args [job_id, paths] and no kwargs")
    job_id, paths = args
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise Refused("job_id", f"job id {str(job_id)[:80]!r} is not valid")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise Refused("schema", "paths must be a list of strings")
    if len(paths) > limits.max_paths:
        raise Refused("too_many_paths", f"{len(paths)} paths; the limit is {limits.max_paths}")
    size = sum(len(p) for p in paths)
    if size > limits.max_bytes:
        raise Refused("too_large", f"{size} characters of paths; the limit is {limits.max_bytes}")
    if version == 1:
        return Message(job_id, [path_text(p) for p in paths], version)
    return Message(job_id, list(paths), version)


def check_path(text: str, roots: Sequence[str] | None) -> tuple[str, str] | None:
    """Why a path of a valid message cannot be read, as (reason, message); None when it may be tried.

    ``roots`` are the job's own roots (None: not recorded, no check). The worker's allowed roots are checked
    again when the file is opened (imgpipe/safety.py).
    """
    try:
        raw = path_bytes(text)
    except (ValueError, UnicodeEncodeError):
        return "not_allowed", "not a path in imgpipe's escaped form"
    if path_text(raw) != text:
        return "not_allowed", "not in imgpipe's canonical escaped form"
    if b"\0" in raw:
        return "not_allowed", "path holds a NUL byte (no file name can)"
    if not raw.startswith(b"/"):
        return "not_allowed", "path must be absolute"
    if roots:
        parts = _lexical(raw)
        for root in roots:
            root_parts = _lexical(os.fsencode(root))
            if parts[: len(root_parts)] == root_parts:
                return None
        return "not_allowed", "path is outside the job's roots"
    return None


def _lexical(raw: bytes) -> list[bytes]:
    """Components of an absolute path with '.', '..' and empty ones resolved as text (no file system)."""
    out: list[bytes] = []
    for part in raw.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out:
                out.pop()
            continue
        out.append(part)
    return out
