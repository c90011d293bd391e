"""Output files the commands write (`-o FILE`): opened up front, written whole or not at all, and a path the
user got wrong is one clear line (ConfigError), never a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from imgpipe.errors import ConfigError


def partial_path(path: Path) -> Path:
    """Where ``path`` is written until it is complete."""
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def output_file(path: Path | None) -> Iterator[IO[str]]:
    """Standard output when ``path`` is None; else ``path``, written as ``PATH.partial`` and renamed onto it
    once the block completes (a reader never sees half a file; an interrupted run leaves only the .partial).

    A folder that does not exist, a path that is a folder, or no permission: ConfigError before any work.
    """
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    partial = partial_path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a folder; give a file name such as {path}/labels.jsonl")
    try:
        stream = open(partial, "w", encoding="utf-8", newline="")  # noqa: SIM115 (closed below)
    except OSError as exc:
        why = "no such folder" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc)).lower()
        raise ConfigError(f"cannot write {path}: {why} ({path.parent})") from None
    with stream:
        yield stream
    partial.replace(path)
