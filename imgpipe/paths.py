"""The one text form of a file path: lossless for any bytes, valid UTF-8 (messages, Redis keys, records).

Linux names are bytes. The text form is the name decoded as UTF-8, each byte that is not valid UTF-8 written
``\\xNN`` (lower-case hex) and each backslash written ``\\\\``; a valid name without a backslash is unchanged.
"""

from __future__ import annotations

import os
import re

_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def path_text(path: str | bytes) -> str:
    """The escaped text form of a path: UTF-8, each byte that is not valid UTF-8 as ``\\xNN``, ``\\`` as ``\\\\``.

    ``path`` is bytes, or a str as Python gives file names (undecodable bytes as lone surrogates).
    """
    if isinstance(path, str):
        if "\\" not in path:
            try:
                path.encode("utf-8")
                return path  # the common case: a valid name without a backslash is its own text form
            except UnicodeEncodeError:
                pass
        try:
            raw = path.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that no file name decodes to: keep its bytes visible
            raw = path.encode("utf-8", "surrogatepass")
    else:
        raw = path
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def path_bytes(text: str) -> bytes:
    """The bytes of a path from its escaped text form; ValueError if ``text`` is not in that form."""
    if "\\" not in text:
        return text.encode("utf-8", "strict")
    parts = []
    last = 0
    for match in _ESCAPE.finditer(text):
        if "\\" in text[last : match.start()]:
            raise ValueError("a backslash must be written \\\\ or \\xNN")
        parts.append(text[last : match.start()].encode("utf-8", "strict"))
        escape = match.group(1)
        parts.append(b"\\" if escape == "\\" else bytes([int(escape[1:], 16)]))
        last = match.end()
    if "\\" in text[last:]:
        raise ValueError("a backslash must be written \\\\ or \\xNN")
    parts.append(text[last:].encode("utf-8", "strict"))
    return b"".join(parts)


def native_path(text: str) -> str:
    """The path as Python opens it (``os.fsdecode`` of its bytes) from its escaped text form."""
    return os.fsdecode(path_bytes(text))
