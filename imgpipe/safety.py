"""Bounded, root-confined file reading: the only way a worker opens an input file."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from imgpipe.errors import ImageError


def confine(path: str | os.PathLike[str], roots: Sequence[Path]) -> Path:
    """Resolve ``path`` (symlinks and ``..`` followed) and require it to lie under one of ``roots``.

    With no roots, any path is accepted (the embedded ``classify`` reads what its user names).
    The file outside a root is never opened: only its name is resolved.
    """
    raw = Path(path)
    if not raw.is_absolute():
        raise ImageError("not_allowed", f"path must be absolute: {str(path)!r}")
    try:
        resolved = raw.resolve(strict=True)
    except FileNotFoundError:
        raise ImageError("not_found", "file not found") from None
    except (OSError, RuntimeError) as exc:  # symlink loop, permission on a parent
        raise ImageError("unreadable", f"cannot resolve path: {exc.__class__.__name__}") from None
    if roots and not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise ImageError("not_allowed", "path is outside the allowed roots (IMGPIPE_ALLOWED_ROOTS)")
    return resolved


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes, refusing links, devices and FIFOs.

    ``path`` should come from :func:`confine`; O_NOFOLLOW closes the race where the last
    component is swapped for a symlink after the check.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError("not_found", "file not found") from None
    except PermissionError:
        raise ImageError("unreadable", "permission denied") from None
    except OSError as exc:
        raise ImageError("unreadable", f"cannot open file: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not_regular", "not a regular file")
        if info.st_size == 0:
            raise ImageError("empty", "empty file (0 bytes)")
        if info.st_size > max_bytes:
            raise ImageError("too_large", f"file is {info.st_size} bytes; the limit is {max_bytes}")
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise ImageError("too_large", f"file grew past the limit of {max_bytes} bytes while reading")
        if not data:
            raise ImageError("empty", "empty file (0 bytes)")
        return data
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
