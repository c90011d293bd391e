"""Streaming: notice image files appearing under a folder and report each once it is completely written.

File-system events (watchdog: inotify on Linux) say where to look; a file is complete when it was closed
after writing, or moved in whole, or, where no such event comes (network file systems, other platforms),
when its size and modification time have stayed the same for a settle time.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from imgpipe import defaults
from imgpipe.scan import is_image_name, scan

log = logging.getLogger(__name__)

# Seconds between checks of the files seen but not yet sent.
POLL_S = 0.1


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
        on_ready: Callable[[str], None],
        settle_s: float = defaults.WATCH_SETTLE_MS / 1000,
        extensions: tuple[str, ...] = defaults.IMAGE_EXTENSIONS,
    ) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.on_ready = on_ready
        self.settle_s = settle_s
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
                # raise no events of their own.
                folder = _text(event.dest_path if kind == "moved" else event.src_path)
                for path in scan(folder, self.extensions):
                    self._note(path, closed=kind == "moved")
            return
        if kind == "moved":
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

    def _forget(self, path: str) -> None:
        with self._lock:
            self._pending.pop(path, None)

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
        for path in ready:
            with self._lock:
                if path in self.sent or self._pending.pop(path, None) is None:
                    continue
                self.sent.add(path)
            self.on_ready(path)
        return ready

    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set."""
        observer = Observer()
        observer.schedule(self, self.root, recursive=True)
        observer.start()
        try:
            while not stop.wait(POLL_S):
                self.check()
        finally:
            observer.stop()
            observer.join(timeout=10)


def _text(path: str | bytes) -> str:
    return os.fsdecode(path)
