"""The one typed, frozen settings object, built once from the ``IMGPIPE_*`` environment.

This is the only module that reads ``os.environ``. Each component gets its own section.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from imgpipe import defaults
from imgpipe.errors import ConfigError

ENV_PREFIX = "IMGPIPE_"


@dataclass(frozen=True)
class RedisSettings:
    url: str = defaults.REDIS_URL
    queue: str = defaults.QUEUE
    visibility_timeout: int = defaults.VISIBILITY_TIMEOUT
    result_ttl_days: int = defaults.RESULT_TTL_DAYS


@dataclass(frozen=True)
class ModelSettings:
    path: Path | None = None  # None: the packaged demo model
    device: str = defaults.DEVICE
    topk: int = defaults.TOPK

    def resolved_path(self) -> Path:
        return self.path if self.path is not None else default_model_path()


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = defaults.MAX_BATCH
    max_wait_ms: int = defaults.MAX_WAIT_MS
    decode_threads: int = defaults.DECODE_THREADS
    chunk_size: int = defaults.CHUNK_SIZE
    watch_settle_ms: int = defaults.WATCH_SETTLE_MS  # `imgpipe watch`: quiet time before a file is sent


@dataclass(frozen=True)
class SecuritySettings:
    # Empty tuple: no restriction (the embedded `classify`); workers require at least one root.
    allowed_roots: tuple[Path, ...] = ()
    max_file_bytes: int = defaults.MAX_FILE_BYTES
    max_pixels: int = defaults.MAX_PIXELS


@dataclass(frozen=True)
class MetricsSettings:
    port: int | None = None  # None: no /metrics endpoint
    bind: str = defaults.METRICS_BIND


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int | None = None  # None: one process per GPU, or one per CPU host
    max_deliveries: int = defaults.MAX_DELIVERIES
    prefetch: int | None = None  # messages held per process; None: PREFETCH_PER_BATCH_IMAGE x max_batch


@dataclass(frozen=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``IMGPIPE_*`` variables; raises ConfigError naming the bad variable."""
        env = os.environ if env is None else env
        get = _Reader(env)
        return cls(
            redis=RedisSettings(
                url=get.text("REDIS_URL", defaults.REDIS_URL),
                queue=get.text("QUEUE", defaults.QUEUE),
                visibility_timeout=get.integer("VISIBILITY_TIMEOUT", defaults.VISIBILITY_TIMEOUT, minimum=1),
                result_ttl_days=get.integer("RESULT_TTL_DAYS", defaults.RESULT_TTL_DAYS, minimum=1),
            ),
            model=ModelSettings(
                path=get.path("MODEL"),
                device=get.text("DEVICE", defaults.DEVICE),
                topk=get.integer("TOPK", defaults.TOPK, minimum=1),
            ),
            batch=BatchSettings(
                max_batch=get.integer("MAX_BATCH", defaults.MAX_BATCH, minimum=1),
                max_wait_ms=get.integer("MAX_WAIT_MS", defaults.MAX_WAIT_MS, minimum=0),
                decode_threads=get.integer("DECODE_THREADS", defaults.DECODE_THREADS, minimum=1),
                chunk_size=get.integer("CHUNK_SIZE", defaults.CHUNK_SIZE, minimum=1),
                watch_settle_ms=get.integer("WATCH_SETTLE_MS", defaults.WATCH_SETTLE_MS, minimum=0),
            ),
            security=SecuritySettings(
                allowed_roots=get.roots("ALLOWED_ROOTS"),
                max_file_bytes=get.integer("MAX_FILE_BYTES", defaults.MAX_FILE_BYTES, minimum=1),
                max_pixels=get.integer("MAX_PIXELS", defaults.MAX_PIXELS, minimum=1),
            ),
            metrics=MetricsSettings(
                port=get.optional_int("METRICS_PORT", minimum=0),
                bind=get.text("METRICS_BIND", defaults.METRICS_BIND),
            ),
            worker=WorkerSettings(
                concurrency=get.optional_int("CONCURRENCY", minimum=1),
                max_deliveries=get.integer("MAX_DELIVERIES", defaults.MAX_DELIVERIES, minimum=1),
                prefetch=get.optional_int("PREFETCH", minimum=1),
            ),
        )

    def with_section(self, **sections: Any) -> Settings:
        """Copy with whole sections replaced, e.g. ``s.with_section(model=replace(s.model, device="cpu"))``."""
        return replace(self, **sections)


def default_model_path() -> Path:
    """The demo CNN shipped as package data of ``imgpipe.model.assets`` (trained by ``imgpipe train`` on the
    demo data); found through importlib.resources, so it works from a wheel, an editable install or a zip."""
    return Path(str(resources.files("imgpipe.model.assets").joinpath(defaults.BUNDLED_MODEL)))


class _Reader:
    """Typed access to ``IMGPIPE_*`` variables with one clear error per bad value."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(ENV_PREFIX + name)
        return value if value not in (None, "") else None

    def text(self, name: str, default: str) -> str:
        value = self._raw(name)
        return default if value is None else value

    def optional_int(self, name: str, minimum: int) -> int | None:
        value = self._raw(name)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name}={value!r} is not an integer") from None
        if number < minimum:
            raise ConfigError(f"{ENV_PREFIX}{name}={number} must be >= {minimum}")
        return number

    def integer(self, name: str, default: int, minimum: int) -> int:
        value = self.optional_int(name, minimum)
        return default if value is None else value

    def path(self, name: str) -> Path | None:
        value = self._raw(name)
        return None if value is None else Path(value).expanduser()

    def roots(self, name: str) -> tuple[Path, ...]:
        value = self._raw(name)
        if value is None:
            return ()
        return parse_roots(value, f"{ENV_PREFIX}{name}")


def parse_roots(value: str, source: str = "allowed roots") -> tuple[Path, ...]:
    """Colon-separated directories, resolved (symlinks followed) so later checks compare real paths."""
    roots = []
    for part in value.split(os.pathsep):
        if not part:
            continue
        root = Path(part).expanduser().resolve()
        if not root.is_dir():
            raise ConfigError(f"{source}: {part!r} is not a directory")
        roots.append(root)
    return tuple(roots)
