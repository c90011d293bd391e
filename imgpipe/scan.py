"""The one folder scanner: which files under a folder are images, in which order (classify, enqueue, watch, train).

The rules, the same for every command:
- recursive, depth first; within a folder, files first in name order, then its sub-folders in name order;
- an image is a name ending in one of the image extensions (case-insensitive), that is a regular file or a
  symlink (the worker decides whether a symlink's target may be read: see docs/pipeline.md);
- symlinked folders are not followed (no loops, no escape from the tree);
- a folder that cannot be read, or an entry that vanishes, is reported to ``on_error`` and skipped;
- an input that is itself a file is taken as given, whatever its name.
Streaming: memory grows with the width of one folder level and the depth, never with the number of files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from imgpipe import defaults
from imgpipe.errors import ConfigError

OnError = Callable[[str, OSError], None]


def is_image_name(name: str, extensions: tuple[str, ...] = defaults.IMAGE_EXTENSIONS) -> bool:
    """True when the file name ends in one of ``extensions`` (case-insensitive)."""
    return name.lower().endswith(extensions)


def scan(
    root: str | os.PathLike[str],
    extensions: tuple[str, ...] = defaults.IMAGE_EXTENSIONS,
    on_error: OnError | None = None,
) -> Iterator[str]:
    """Absolute paths of image files under ``root``, depth first, as they are found.

    See the module docstring for the rules.
    """
    start = os.path.abspath(root)
    stack = [start]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                files, subdirs = [], []
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.path)
                        elif is_image_name(entry.name, extensions) and (
                            entry.is_file(follow_symlinks=False) or entry.is_symlink()
                        ):
                            files.append(entry.path)
                    except OSError as exc:  # the entry vanished or cannot be stat'ed
                        if on_error is not None:
                            on_error(entry.path, exc)
        except OSError as exc:
            if on_error is not None:
                on_error(directory, exc)
            continue
        yield from sorted(files)
        stack.extend(reversed(sorted(subdirs)))


def distinct_roots(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Absolute, de-duplicated inputs with nested folders dropped, so that no file is scanned twice.

    Raises ConfigError for a path that does not exist.
    """
    absolute: list[str] = []
    for raw in paths:
        path = os.path.abspath(raw)
        if not os.path.lexists(path):
            raise ConfigError(f"no such file or directory: {raw}")
        if path not in absolute:
            absolute.append(path)
    folders = [p for p in absolute if os.path.isdir(p)]
    kept = []
    for path in absolute:
        # A nested folder, or a nested file its folder's scan finds anyway, is dropped; a nested file the scan
        # would not pick (not an image name) stays, since a file named directly is taken whatever its name.
        scanned_anyway = os.path.isdir(path) or is_image_name(os.path.basename(path))
        if scanned_anyway and any(path != folder and _inside(path, folder) for folder in folders):
            continue
        kept.append(path)
    return kept


def _inside(path: str, folder: str) -> bool:
    """``path`` lies under ``folder`` both as written and once resolved: a scan of ``folder`` reaches it."""
    lexical = Path(path).is_relative_to(folder)
    return lexical and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def scan_all(
    inputs: Iterable[str | os.PathLike[str]],
    extensions: tuple[str, ...] = defaults.IMAGE_EXTENSIONS,
    on_error: OnError | None = None,
) -> Iterator[str]:
    """Image paths under each input folder; an input that is a file is yielded as given, whatever its name."""
    for path in distinct_roots(inputs):
        if os.path.isdir(path):
            yield from scan(path, extensions, on_error)
        else:
            yield path


def no_images_message(paths: Iterable[str | os.PathLike[str]]) -> str:
    """The one line for inputs that hold no image file (`classify` and `enqueue` refuse them alike)."""
    return (
        f"no image files under {', '.join(map(str, paths))} (looked for "
        f"{' '.join(defaults.IMAGE_EXTENSIONS)}, recursively); nothing to do"
    )
