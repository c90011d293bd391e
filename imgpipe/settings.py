"""The one typed, frozen settings object, built once from the ``IMGPIPE_*`` environment.

This is the only module that reads ``os.environ``. Each component gets its own section.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click

from imgpipe import defaults, threads
from imgpipe.errors import ConfigError

ENV_PREFIX = "IMGPIPE_"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RedisSettings:
    url: str = defaults.REDIS_URL
    queue: str = defaults.QUEUE
    visibility_timeout: int = defaults.VISIBILITY_TIMEOUT
    socket_timeout: int = defaults.REDIS_SOCKET_TIMEOUT
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
    decode_threads: int = defaults.DECODE_THREADS  # 0 becomes a count from the cores (imgpipe/threads.py)
    torch_threads: int = defaults.TORCH_THREADS  # 0: chosen per device by the engine (imgpipe/threads.py)
    max_latency_ms: int = defaults.MAX_LATENCY_MS  # 0: adaptive batching off
    cpu_infer_batch: int = defaults.CPU_INFER_BATCH  # on the CPU, images per forward pass (model/engine.py)
    serial_decode_bytes: int = defaults.SERIAL_DECODE_BYTES  # files this small: one lane at a time (model/engine.py)

    def __post_init__(self) -> None:
        if self.decode_threads == 0:
            object.__setattr__(self, "decode_threads", threads.decode_threads())


@dataclass(frozen=True)
class ProducerSettings:
    chunk_size: int = defaults.CHUNK_SIZE
    watch_settle_ms: int = defaults.WATCH_SETTLE_MS  # `imgpipe watch`: quiet time before a file is sent
    watch_rescan_s: int = defaults.WATCH_RESCAN_S  # `imgpipe watch`: seconds between rescans for lost events


@dataclass(frozen=True)
class SecuritySettings:
    # Empty tuple: no restriction (the embedded `classify`); workers require at least one root.
    allowed_roots: tuple[Path, ...] = ()
    max_file_bytes: int = defaults.MAX_FILE_BYTES
    max_pixels: int = defaults.MAX_PIXELS
    allow_hardlinks: int = 0  # 1: read files with more than one hard link (st_nlink > 1)


@dataclass(frozen=True)
class MetricsSettings:
    port: int | None = None  # None: no /metrics endpoint
    bind: str = defaults.METRICS_BIND


@dataclass(frozen=True)
class ExporterSettings:
    port: int = defaults.EXPORTER_PORT
    bind: str = defaults.METRICS_BIND


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int | None = None  # None: one process per GPU, or per core on a CPU host (threads.cpu_processes)
    max_deliveries: int = defaults.MAX_DELIVERIES
    prefetch: int | None = None  # messages held per process; None: (decode threads + 1) x max batch
    health_dir: Path | None = None  # None: <temp dir>/imgpipe-health-<uid> (see imgpipe/health.py)
    lease_ttl: int = defaults.LEASE_TTL_S  # seconds a message's lease lives without renewal
    work_images: int | None = None  # images in decode/inference at once; None: decode threads x max batch
    max_message_paths: int = defaults.MAX_MESSAGE_PATHS
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES
    reload: int = defaults.RELOAD  # 1: reload the model when its file is replaced (docs/models.md)
    pinned_only: int = defaults.PINNED_ONLY  # 1: only the model's own queue, not the default one (docs/models.md)


SECTIONS = ("redis", "model", "batch", "producer", "security", "metrics", "exporter", "worker")


@dataclass(frozen=True)
class Var:
    """One ``IMGPIPE_*`` variable: where it lands in the settings, how it is read, and what it means."""

    name: str  # after the IMGPIPE_ prefix
    section: str
    attr: str
    kind: str  # text | int | optional_int | path | roots | switch (0 or 1)
    help: str
    minimum: int = 0

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")


# Every variable any command honours: the one table the README's settings table is checked against.
VARS: tuple[Var, ...] = (
    Var("REDIS_URL", "redis", "url", "text", "broker and result store; rediss:// and passwords work"),
    Var("QUEUE", "redis", "queue", "text", "the Celery queue producers send to and workers consume"),
    Var(
        "VISIBILITY_TIMEOUT",
        "redis",
        "visibility_timeout",
        "int",
        "seconds before an unacknowledged message is redelivered",
        1,
    ),
    Var("RESULT_TTL_DAYS", "redis", "result_ttl_days", "int", "days a job's records and counters are kept", 1),
    Var(
        "REDIS_SOCKET_TIMEOUT",
        "redis",
        "socket_timeout",
        "int",
        "seconds a Redis reply may take before the connection is dropped and the command retried on a new one",
        1,
    ),
    Var("MODEL", "model", "path", "path", "model file (TorchScript with imgpipe metadata); default: the bundled demo"),
    Var("DEVICE", "model", "device", "text", "auto (first GPU, else CPU), cpu, cuda or cuda:N"),
    Var("TOPK", "model", "topk", "int", "labels (with scores) per record", 1),
    Var("MAX_BATCH", "batch", "max_batch", "int", "images per inference batch", 1),
    Var("MAX_WAIT_MS", "batch", "max_wait_ms", "int", "longest a worker waits to fill a batch (ms)", 0),
    Var(
        "DECODE_THREADS",
        "batch",
        "decode_threads",
        "int",
        "lanes: threads that each read, decode and predict a batch (0: one per core)",
        0,
    ),
    Var("CHUNK_SIZE", "producer", "chunk_size", "int", "image paths per queue message (`enqueue`, `watch`)", 1),
    Var(
        "WATCH_SETTLE_MS",
        "producer",
        "watch_settle_ms",
        "int",
        "`watch`: ms a new file's size must stay unchanged before it is sent, unless closed after write or renamed in",
        0,
    ),
    Var(
        "WATCH_RESCAN_S",
        "producer",
        "watch_rescan_s",
        "int",
        "`watch`: s between rescans for new files no event named (lost events); 0: only when the kernel reports a loss",
        0,
    ),
    Var(
        "ALLOWED_ROOTS",
        "security",
        "allowed_roots",
        "roots",
        "colon-separated directories a worker may read; anything else is refused (required by `worker`)",
    ),
    Var("MAX_FILE_BYTES", "security", "max_file_bytes", "int", "larger files are refused before decoding", 1),
    Var("MAX_PIXELS", "security", "max_pixels", "int", "larger images are refused from their header", 1),
    Var(
        "METRICS_PORT", "metrics", "port", "optional_int", "port of a worker's /metrics (0: any free port; unset: off)"
    ),
    Var("METRICS_BIND", "metrics", "bind", "text", "address a worker's /metrics binds to"),
    Var("EXPORTER_PORT", "exporter", "port", "int", "port of `imgpipe exporter`'s /metrics", 0),
    Var("EXPORTER_BIND", "exporter", "bind", "text", "address `imgpipe exporter`'s /metrics binds to"),
    Var(
        "CONCURRENCY",
        "worker",
        "concurrency",
        "optional_int",
        "worker processes (default: one per GPU; on a CPU host one per core, as memory allows at 1 GiB each); "
        "more than one per GPU measured far slower (README, On a GPU)",
        1,
    ),
    Var("MAX_DELIVERIES", "worker", "max_deliveries", "int", "deliveries of a message before it is dead-lettered", 1),
    Var(
        "PREFETCH",
        "worker",
        "prefetch",
        "optional_int",
        "messages one worker process holds (default: (decode threads + 1) x max batch; its images are bounded "
        "to that many too)",
        1,
    ),
    Var(
        "HEALTH_DIR",
        "worker",
        "health_dir",
        "path",
        "folder where each worker process keeps the sentinel `imgpipe worker --check` reads "
        "(default: $TMPDIR/imgpipe-health-<uid>)",
    ),
    Var("TORCH_THREADS", "batch", "torch_threads", "int", "torch intra-op threads (0: from the cores and device)", 0),
    Var(
        "CPU_INFER_BATCH",
        "batch",
        "cpu_infer_batch",
        "int",
        "on the CPU, images per forward pass: a larger batch runs through the model in pieces of this size",
        1,
    ),
    Var(
        "SERIAL_DECODE_BYTES",
        "batch",
        "serial_decode_bytes",
        "int",
        "files up to this size are decoded by one lane at a time, larger ones in parallel (bytes; 0: all in parallel)",
        0,
    ),
    Var(
        "MAX_LATENCY_MS",
        "batch",
        "max_latency_ms",
        "int",
        "adaptive batching: p95 target from message receipt to record; sizes batches and the images a worker"
        " holds (ms; 0: off)",
        0,
    ),
    Var("ALLOW_HARDLINKS", "security", "allow_hardlinks", "switch", "1: read files that have other hard links", 0),
    Var("LEASE_TTL", "worker", "lease_ttl", "int", "seconds a dead worker's messages stay leased before resent", 3),
    Var(
        "WORK_IMAGES",
        "worker",
        "work_images",
        "optional_int",
        "images in decode and inference at once per process (default: decode threads x max batch)",
        1,
    ),
    Var("MAX_MESSAGE_PATHS", "worker", "max_message_paths", "int", "larger messages are refused", 1),
    Var("MAX_MESSAGE_BYTES", "worker", "max_message_bytes", "int", "messages with more path text are refused", 1),
    Var(
        "RELOAD", "worker", "reload", "switch", "1: reload the model when its file is replaced (SIGHUP always does)", 0
    ),
    Var(
        "PINNED_ONLY",
        "worker",
        "pinned_only",
        "switch",
        "1: consume only the model's own queue (jobs pinned to it), not the default queue",
        0,
    ),
)
VARS_BY_NAME = {var.name: var for var in VARS}


@dataclass(frozen=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    producer: ProducerSettings = field(default_factory=ProducerSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    exporter: ExporterSettings = field(default_factory=ExporterSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        sections: Iterable[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Settings from ``IMGPIPE_*`` variables, with command-line ``overrides`` applied in the same step.

        Only the variables of ``sections`` (default: all) are read and validated, so a command is never
        refused for a setting it does not use; the others keep their defaults. ``overrides`` maps a variable
        name (``MAX_BATCH``) or a click parameter name (``max_batch``) to a flag's value; None means "not
        given". A bad value raises ConfigError naming the variable or the flag.
        """
        env = os.environ if env is None else env
        wanted = set(SECTIONS if sections is None else sections)
        unknown = wanted - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown settings sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
        given = {key.upper(): value for key, value in (overrides or {}).items() if value is not None}
        for key in given:
            if key not in VARS_BY_NAME:
                raise ValueError(f"override {key!r} is not a setting; valid: {', '.join(VARS_BY_NAME)}")
        values: dict[str, dict[str, Any]] = {section: {} for section in wanted}
        for var in VARS:
            if var.section not in wanted:
                continue
            if var.name in given:
                value = _read(var, _as_text(given[var.name]), var.flag)
            else:
                raw = env.get(var.env)
                value = _read(var, raw, var.env) if raw not in (None, "") else _NOT_SET
            if value is not _NOT_SET:
                values[var.section][var.attr] = value
        settings = cls()
        return replace(
            settings, **{section: replace(getattr(settings, section), **kw) for section, kw in values.items()}
        )

    def with_section(self, **sections: Any) -> Settings:
        """Copy with whole sections replaced, e.g. ``s.with_section(model=replace(s.model, device="cpu"))``."""
        return replace(self, **sections)


_NOT_SET = object()


def _as_text(value: Any) -> str:
    return os.pathsep.join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def _read(var: Var, raw: str | None, source: str) -> Any:
    """``raw`` parsed as ``var`` says; ConfigError naming ``source`` (the variable or the flag) when invalid."""
    if raw is None:
        return _NOT_SET
    if var.kind == "text":
        return raw
    if var.kind == "path":
        return Path(raw).expanduser()
    if var.kind == "roots":
        return parse_roots(raw, source)
    if var.kind == "switch":
        if raw.strip() not in ("0", "1"):
            raise ConfigError(f"{source}={raw!r} must be 0 or 1")
        return int(raw)
    try:
        number = int(raw)
    except ValueError:
        raise ConfigError(f"{source}={raw!r} is not an integer") from None
    if number < var.minimum:
        raise ConfigError(f"{source}={number} must be >= {var.minimum}")
    return number


def setting_option(name: str, *flags: str, help: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """A click option for the ``IMGPIPE_<name>`` setting: the flag overrides the variable in one place
    (``Settings.from_env(overrides=...)``), so click reads no environment and the help names both."""
    var = VARS_BY_NAME[name]
    default = getattr(getattr(Settings(), var.section), var.attr)
    shown = "" if default is None or var.kind == "roots" else f"; default {default}"
    text = f"{help or var.help[:1].upper() + var.help[1:]}.  [env {var.env}{shown}]"
    return click.option(*(flags or (var.flag,)), name.lower(), default=None, help=text, **kwargs)


def default_model_path() -> Path:
    """The demo CNN shipped as package data of ``imgpipe.model.assets`` (trained by ``imgpipe train`` on the
    demo data); found through importlib.resources, so it works from a wheel, an editable install or a zip."""
    return Path(str(resources.files("imgpipe.model.assets").joinpath(defaults.BUNDLED_MODEL)))


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


C = TypeVar("C", bound=click.Command)


def honours(*sections: str, exclude: Iterable[str] = ()) -> Callable[[C], C]:
    """Decorate a click command (put it above ``@click.command``) so that its --help ends with the
    ``IMGPIPE_*`` variables of ``sections`` it has no flag for, each with its meaning and default: --help
    then names every setting the command reads. ``exclude``: variables the command reads elsewhere (an
    argument that takes their place)."""
    skip = set(exclude)

    def decorate(command: C) -> C:
        flagged = {(param.name or "").upper() for param in command.params}
        rest = [var for var in VARS if var.section in sections and var.name not in flagged | skip]
        if rest:
            lines = ["\b", "Also read from the environment:"]
            lines += [f"  {var.env}: {var.help}{_default_note(var)}" for var in rest]
            command.epilog = "\n".join(filter(None, [command.epilog, "\n".join(lines)]))
        return command

    return decorate


def default_of(var: Var) -> Any:
    """The value ``var`` has when its variable is not set, as declared (DECODE_THREADS: 0, "from the cores",
    not this machine's count, so that help and the README say the same on every host)."""
    section = type(getattr(Settings(), var.section))
    declared = next(f for f in fields(section) if f.name == var.attr)
    return declared.default if declared.default is not MISSING else getattr(section(), var.attr)


def _default_note(var: Var) -> str:
    default = default_of(var)
    return "" if default in (None, ()) else f" [default {default}]"


def markdown_table() -> str:
    """The README's settings table, rendered from VARS (tests/test_cli_ux.py checks that they agree;
    regenerate with ``python -m imgpipe.settings``)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for var in VARS:
        default = default_of(var)
        shown = "(unset)" if default in (None, ()) else f"`{default}`"
        lines.append(f"| `{var.env}` | {shown} | {var.help} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
