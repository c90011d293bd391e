"""Celery's start-up warnings and log lines that imgpipe has dealt with, handled on purpose in one place.

- Celery's root-user ``SecurityWarning`` ("running the worker with superuser privileges"): the danger it warns
  of is pickle messages, which imgpipe refuses (``accept_content`` is JSON only; see imgpipe/broker.py), and
  the Docker image runs workers as an unprivileged user. It is silenced only while pickle stays refused, and
  replaced by one imgpipe line saying so; with pickle accepted, Celery's own check stands untouched.
- kombu's "Connected to redis://:**@host" masks a password even where there is none: the line is rewritten
  with ``imgpipe.broker.safe_url``, which masks only a real one.

Nothing else is filtered: any other warning still shows. ``install()`` is called once by the worker entry
(before ``app.Worker(...)``); it hooks Celery's ``celeryd_init`` signal, so it acts in worker processes only.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from imgpipe.broker import safe_url

log = logging.getLogger("imgpipe.worker")

# Celery's root-user warning (celery.platforms.ROOT_DISCOURAGED) starts with this.
ROOT_WARNING = r"You're running the worker with superuser privileges"
# kombu's connection line (celery.worker.consumer.connection).
CONNECTED_LOGGER = "celery.worker.consumer.connection"
PICKLE_CONTENT = ("pickle", "application/x-python-serialize", "application/group-python-serialize")

_installed = False


class SafeUrlFilter(logging.Filter):
    """Rewrites "Connected to <masked url>" with the real URL as ``safe_url`` prints it."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Connected to %s":
            record.args = (safe_url(self.url),)
        return True


def handle_worker_start(broker_url: str, accept_content: Any) -> None:
    """What ``install`` does as a worker starts: given the app's broker URL and accepted content types."""
    logging.getLogger(CONNECTED_LOGGER).addFilter(SafeUrlFilter(broker_url))
    accepts_pickle = any(content in PICKLE_CONTENT for content in accept_content or ())
    is_root = hasattr(os, "geteuid") and (os.getuid() == 0 or os.geteuid() == 0)
    if is_root and not accepts_pickle:
        from celery.exceptions import SecurityWarning

        warnings.filterwarnings("ignore", message=ROOT_WARNING, category=SecurityWarning)
        log.warning(
            "running as root: this worker accepts JSON messages only (never pickle), so Celery's root warning "
            "does not apply; still, run workers as an unprivileged user (the Docker image does)"
        )


def install() -> None:
    """Hook ``handle_worker_start`` to Celery's ``celeryd_init`` signal (once per process)."""
    global _installed
    if _installed:
        return
    from celery.signals import celeryd_init

    def on_init(sender: Any = None, conf: Any = None, **_: Any) -> None:
        if conf is not None:
            handle_worker_start(str(conf.broker_url), conf.accept_content)

    celeryd_init.connect(on_init, weak=False)
    _installed = True
