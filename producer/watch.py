"""Streaming: notice image files appearing under a folder and report each once it is completely written.

File-system events (watchdog: inotify on Linux) say where to look; a file is complete when it was closed
after writing, or moved in whole, or, where no such event comes (network file systems, other platforms),
when its size and modification time have stayed the same for a settle time. Files that become ready together
(within a few ms, defaults.WATCH_COALESCE_MS) are handed over as one list, so a burst of files is sent as a
few chunked messages rather than one message per file.

Events can be lost: the kernel keeps at most fs.inotify.max_queued_events (16,384 by default) unread, and a
burst past that is dropped (30,000 files moved in at once: 10,767 never sent). So the folder is also rescanned,
at once when watchdog reports an overflow and every defaults.WATCH_RESCAN_S seconds: a file that changed since
the watch began (its ctime) and that was neither sent nor seen is taken as if an event had named it, and waits
for its size to settle.
"""

from __future__ import annotations

import logging
import math
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
# A file whose ctime is at most this much older than the watch's start still counts as new for a rescan: file
# systems stamp times from a coarse clock (a tick, up to 10 ms, behind the clock the watch reads).
CTIME_SLACK_NS = 20_000_000
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
        rescan_s: float = defaults.WATCH_RESCAN_S,
    ) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.on_ready = on_ready
        self.on_batch = on_batch  # when set, the files ready in one check go out as one list
        self.settle_s = settle_s
        self.coalesce_s = coalesce_s
        self.rescan_s = rescan_s
        self.recovered = 0  # files found by a rescan, with no event seen for them
        self._wake = threading.Event()  # set by each event: a check soon, after the coalescing wait
        self._rescan = threading.Event()  # set when events were lost: a rescan at the next check
        self._since_ns = 0  # time.time_ns() when the watch began: a file changed since then is new
        self._next_rescan = 0.0  # time.monotonic() of the next periodic rescan
        self._overflow_hook: _OverflowHook | None = None
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

    def rescan(self) -> int:
        """Take the files under the root that changed since the watch began and were neither sent nor seen as if
        an event had named them (not closed: each waits for its size to settle); returns how many. What events
        were lost (a kernel queue overflow) comes back this way."""
        self._rescan.clear()
        found = 0
        for path in scan(self.root, self.extensions):
            with self._lock:
                if path in self.sent or path in self._pending:
                    continue
            try:
                changed = os.lstat(path).st_ctime_ns
            except OSError:  # gone meanwhile
                continue
            if changed >= self._since_ns:
                self._note(path, closed=False)
                found += 1
        if found:
            self.recovered += found
            log.warning(
                "found %d new files under %s that no event named (events lost?); sending them", found, self.root
            )
        return found

    def _plan_rescan(self) -> None:
        """The next periodic rescan, ``rescan_s`` from now (none when 0: only after a reported loss)."""
        self._next_rescan = time.monotonic() + self.rescan_s if self.rescan_s > 0 else math.inf

    def start(self) -> None:
        """Start watching now: events from this point on are seen (``run`` starts it if not started)."""
        if self._observer is None:
            # Before the observer starts: a file that lands meanwhile is named by an event or found by a rescan.
            self._since_ns = time.time_ns() - CTIME_SLACK_NS
            self._plan_rescan()
            self._overflow_hook = _OverflowHook(self)
            logging.getLogger("watchdog").addHandler(self._overflow_hook)
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
                if self._rescan.is_set() or time.monotonic() >= self._next_rescan:
                    self._plan_rescan()
                    self.rescan()
                self.check()
        finally:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
            if self._overflow_hook is not None:
                logging.getLogger("watchdog").removeHandler(self._overflow_hook)
                self._overflow_hook = None


class _OverflowHook(logging.Handler):
    """Asks ``watcher`` for a rescan when watchdog reports that the kernel dropped events (it logs a warning and
    rebuilds its watches; the files named by the lost events are never reported). The periodic rescan covers a
    watchdog that says it otherwise."""

    def __init__(self, watcher: Watcher) -> None:
        super().__init__(logging.WARNING)
        self.watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg).lower():
            self.watcher._rescan.set()
            self.watcher._wake.set()


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
