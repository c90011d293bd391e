"""Streaming: notice image files appearing under a folder and report each once it is completely written.

File-system events (watchdog: inotify on Linux) say where to look; a file is complete when it was closed
after writing, or moved in whole, or, where no such event comes (network file systems, other platforms),
when its size and modification time have stayed the same for a settle time. Files that become ready together
(within a few ms, defaults.WATCH_COALESCE_MS) are handed over as one list, so a burst of files is sent as a
few chunked messages rather than one message per file.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from imgpipe import defaults
from imgpipe.scan import is_image_name, scan

log = logging.getLogger(__name__)

# Seconds between checks of the files seen but not yet sent, when no event wakes the watcher sooner.
POLL_S = 0.1
# The events the watcher acts on (``on_any_event``). With inotify the filter is also the kernel's mask: the opens,
# reads and closes of the workers reading the files it sent raise no events in this process.
EVENTS = (
    FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
    DirCreatedEvent, DirMovedEvent, DirDeletedEvent,
)  # fmt: skip


@dataclass
class _Pending:
    closed: bool  # a close-after-write or move-in event came after the last change
    signature: tuple[int, int] | None = None  # (size, mtime_ns) at the last check
    changed_at: float = 0.0


class Watcher(FileSystemEventHandler):
    """Calls ``on_ready(path)`` once for each new image file under ``root``, when it is complete."""

    def __init__(
        self,
        root: str,
        on_ready: Callable[[str], None] | None = None,
        settle_s: float = defaults.WATCH_SETTLE_MS / 1000,
        extensions: tuple[str, ...] = defaults.IMAGE_EXTENSIONS,
        *,
        on_batch: Callable[[list[str]], object] | None = None,
        coalesce_s: float = defaults.WATCH_COALESCE_MS / 1000,
    ) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.on_ready = on_ready
        self.on_batch = on_batch  # when set, the files ready in one check go out as one list
        self.settle_s = settle_s
        self.coalesce_s = coalesce_s
        self._wake = threading.Event()  # set by each event: a check soon, after the coalescing wait
        self._observer: Any = None
        self.extensions = extensions
        self.sent: set[str] = set()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def mark_sent(self, path: str) -> None:
        """Treat ``path`` as already sent (e.g. enqueued by an initial scan)."""
        with self._lock:
            self.sent.add(path)
            self._pending.pop(path, None)

    # -- events (observer thread) ------------------------------------------------------------------------

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if event.is_directory:
            if kind in ("created", "moved"):
                # Files already inside a folder that was moved in (or filled before its watch was set up)
                # raise no events of their own. A folder moved out of the tree has no destination here.
                folder = _text(event.dest_path if kind == "moved" else event.src_path)
                if folder:
                    for path in scan(folder, self.extensions):
                        self._note(path, closed=kind == "moved")
            if kind in ("moved", "deleted"):
                self._forget_under(_text(event.src_path))
            return
        if kind == "moved":  # within the tree, or (no source) moved in from outside it: complete at once
            self._forget(_text(event.src_path))
            self._note(_text(event.dest_path), closed=True)
        elif kind == "closed":
            self._note(_text(event.src_path), closed=True)
        elif kind in ("created", "modified"):
            self._note(_text(event.src_path), closed=False)
        elif kind == "deleted":
            self._forget(_text(event.src_path))

    def _note(self, path: str, closed: bool) -> None:
        if not is_image_name(os.path.basename(path), self.extensions):
            return
        with self._lock:
            if path in self.sent:
                return
            pending = self._pending.get(path)
            if pending is None:
                self._pending[path] = _Pending(closed=closed)
            else:
                pending.closed = closed
        self._wake.set()

    def _forget(self, path: str) -> None:
        with self._lock:
            self._pending.pop(path, None)

    def _forget_under(self, folder: str) -> None:
        """A folder moved away or deleted: its files are no longer to be sent."""
        if not folder:
            return
        prefix = folder.rstrip(os.sep) + os.sep
        with self._lock:
            for path in [p for p in self._pending if p.startswith(prefix)]:
                del self._pending[path]

    # -- checks (caller's thread) ------------------------------------------------------------------------

    def check(self, now: float | None = None) -> list[str]:
        """Send the pending files that are complete now; returns them."""
        now = time.monotonic() if now is None else now
        ready = []
        with self._lock:
            candidates = list(self._pending.items())
        for path, pending in candidates:
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                self._forget(path)
                continue
            except OSError as exc:
                log.warning("cannot stat %s: %s", path, exc)
                continue
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                self._forget(path)
                continue
            signature = (info.st_size, info.st_mtime_ns)
            if signature != pending.signature:
                pending.signature = signature
                pending.changed_at = now
            quiet = now - pending.changed_at
            # A closed or moved-in file is complete now, unless empty: an empty file may be a placeholder
            # that is about to be written, so it waits like one without a close event.
            needed = 0.0 if pending.closed and info.st_size > 0 else self.settle_s
            if quiet >= needed:
                ready.append(path)
        fresh = []
        for path in ready:
            with self._lock:
                if path in self.sent or self._pending.pop(path, None) is None:
                    continue
                self.sent.add(path)
            fresh.append(path)
        if self.on_batch is not None:
            if fresh:
                self.on_batch(fresh)
        elif self.on_ready is not None:
            for path in fresh:
                self.on_ready(path)
        return fresh

    def start(self) -> None:
        """Start watching now: events from this point on are seen (``run`` starts it if not started)."""
        if self._observer is None:
            self._observer = _observer()
            self._observer.schedule(self, self.root, recursive=True, event_filter=list(EVENTS))
            self._observer.start()

    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set. After an event, wait ``coalesce_s`` for more to land, then check:
        a burst of files goes out together, and a lone file waits only those few ms."""
        self.start()
        try:
            while not stop.is_set():
                if self._wake.wait(POLL_S):
                    if stop.wait(self.coalesce_s):
                        break
                    self._wake.clear()
                self.check()
        finally:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None


def _observer() -> Any:
    """watchdog's observer for this platform. With inotify (Linux) it reports full move events: a file renamed
    into the tree from outside it comes as a move with no source, so it is complete at once. Without them it
    came as a creation, which must settle (WATCH_SETTLE_MS): each file landed by rename, as cameras and upload
    services land them, waited half a second before it was sent (300 photos moved in: the first sent 0.5 s
    after they landed)."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux
        return Observer()
    return InotifyObserver(generate_full_events=True) if Observer is InotifyObserver else Observer()


def _text(path: str | bytes | None) -> str:
    """A path of an event as text; "" for the missing side of a move into or out of the tree."""
    return os.fsdecode(path) if path else ""
