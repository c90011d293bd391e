"""`imgpipe bench`: the engine, enqueue and pipeline suites against baselines measured in the same run, as ratios.

Torch is imported only by the suites that need it, so `imgpipe bench --suite enqueue` runs on a producer host.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from imgpipe.bench.results import BenchError, SuiteResult
from imgpipe.errors import ConfigError
from imgpipe.scratch_redis import ScratchRedisError, scratch_redis
from imgpipe.settings import Settings

SUITES = ("engine", "photos", "enqueue", "pipeline")
# Suites that need the scratch redis-server (skipped without one).
REDIS_SUITES = ("enqueue", "pipeline")


def parse_suites(text: str) -> list[str]:
    """The suites named in a comma-separated list, in their fixed order; ConfigError for an unknown one."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(SUITES))
    if unknown or not names:
        raise ConfigError(
            f"--suite {text!r}: unknown suite {', '.join(unknown) or '(none)'}; valid: {', '.join(SUITES)}"
        )
    return [suite for suite in SUITES if suite in names]


@click.command()
@click.argument("data", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--suite",
    "suites",
    default=",".join(SUITES),
    show_default=True,
    help=f"Comma-separated suites to run: {', '.join(SUITES)}.",
)
@click.option(
    "--images",
    default=2000,
    show_default=True,
    type=click.IntRange(min=1),
    help="engine: images per measurement (inputs repeat to fill).",
)
@click.option(
    "--batch-size",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="engine: batch size; pipeline: the worker's IMGPIPE_MAX_BATCH (against 1).",
)
@click.option(
    "--decode-threads",
    default=None,
    type=click.IntRange(min=1),
    help="Decode threads of the engine and the worker [env IMGPIPE_DECODE_THREADS; default 4].",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Model file [env IMGPIPE_MODEL; default: the bundled demo digits CNN].",
)
@click.option("--device", default="cpu", show_default=True, help="Device of the engine and the worker.")
@click.option(
    "--repeat", default=3, show_default=True, type=click.IntRange(min=1), help="Runs per variant; the median counts."
)
@click.option(
    "--paths",
    default=20000,
    show_default=True,
    type=click.IntRange(min=1),
    help="enqueue: synthetic paths per measurement.",
)
@click.option(
    "--chunk-size",
    default=None,
    type=click.IntRange(min=1),
    help="enqueue: paths per message [env IMGPIPE_CHUNK_SIZE; default 32].",
)
@click.option(
    "--scan-files",
    default=20000,
    show_default=True,
    type=click.IntRange(min=1),
    help="enqueue: empty files in the generated tree that the scan walks.",
)
@click.option(
    "--pipeline-images",
    default=600,
    show_default=True,
    type=click.IntRange(min=1),
    help="pipeline: images per job, one per message.",
)
def bench(
    data: Path | None,
    suites: str,
    images: int,
    batch_size: int,
    decode_threads: int | None,
    model_path: Path | None,
    device: str,
    repeat: int,
    paths: int,
    chunk_size: int | None,
    scan_files: int,
    pipeline_images: int,
) -> None:
    """Benchmark imgpipe against naive baselines measured in the same run, reported as ratios.

    \b
    engine    the in-process engine against one image at a time (images of DATA, or the demo images)
    photos    the same on generated photo-sized JPEGs (2048x1536), where decoding dominates
    enqueue   the producer against a plain Celery send_task loop, and the folder scan
    pipeline  a real `imgpipe worker` fed one-image messages, batching across messages (--batch-size)
              against IMGPIPE_MAX_BATCH=1 (images of DATA, or the demo images)

    A table per suite, then one JSON line with every suite's rates and ratios. enqueue and pipeline start
    their own redis-server on a free loopback port (never IMGPIPE_REDIS_URL); without redis-server they are
    skipped.
    """
    chosen = parse_suites(suites)
    settings = Settings.from_env(sections=("model", "batch", "security", "producer"))
    options = _Options(
        data=data,
        images=images,
        batch_size=batch_size,
        decode_threads=decode_threads or settings.batch.decode_threads,
        model=(model_path or settings.model.resolved_path()).absolute(),
        device=device,
        repeat=repeat,
        paths=paths,
        chunk_size=chunk_size or settings.producer.chunk_size,
        scan_files=scan_files,
        pipeline_images=pipeline_images,
    )
    summary: dict[str, Any] = {}
    with ExitStack() as stack:
        run = _Run(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgpipe-bench-"))), settings, options)
        for suite in chosen:
            if suite in REDIS_SUITES and run.redis_url is None:
                try:
                    run.redis_url = stack.enter_context(scratch_redis(run.tmp / "redis"))
                except ScratchRedisError as exc:
                    click.echo(f"{suite}: skipped: {exc}\n")
                    summary[suite] = {"skipped": str(exc)}
                    continue
            try:
                result = run.suite(suite)
            except BenchError as exc:
                raise click.ClickException(f"{suite} suite: {exc}") from None
            click.echo(result.table() + "\n")
            summary[suite] = result.summary()
    click.echo(json.dumps(summary))


@dataclass(frozen=True)
class _Options:
    data: Path | None
    images: int
    batch_size: int
    decode_threads: int
    model: Path
    device: str
    repeat: int
    paths: int
    chunk_size: int
    scan_files: int
    pipeline_images: int


@dataclass
class _Run:
    """One `imgpipe bench` run: its temp folder, the demo images (written once, when a suite needs them), and
    the scratch Redis that the enqueue and pipeline suites share."""

    tmp: Path
    settings: Settings
    options: _Options
    redis_url: str | None = None
    _demo: Path | None = None

    def images(self) -> Path:
        if self.options.data is not None:
            return self.options.data
        if self._demo is None:
            from imgpipe.model.data import write_demo_dataset

            write_demo_dataset(self.tmp / "demo")
            self._demo = self.tmp / "demo"
        return self._demo

    def suite(self, name: str) -> SuiteResult:
        o = self.options
        if name in ("engine", "photos"):
            from imgpipe.bench.engine import run_bench, write_photos
            from imgpipe.model.cli import load_engine

            engine = load_engine(
                self.settings.with_section(model=replace(self.settings.model, path=o.model, device=o.device))
            )
            if name == "engine":
                data, images = (o.data if o.data is not None else self.images() / "val"), o.images
            else:  # photo-sized JPEGs, where decoding dominates; fewer, as each costs ~30x a digit
                data, images = write_photos(self.tmp / "photos", count=min(100, o.images)), max(1, o.images // 5)
            return run_bench(
                engine,
                data,
                images=images,
                batch_size=o.batch_size,
                decode_threads=o.decode_threads,
                repeat=o.repeat,
                name=name,
            )
        if self.redis_url is None:
            raise BenchError(f"the {name} suite needs the scratch Redis")
        if name == "enqueue":
            from imgpipe.bench.enqueue import run_enqueue_bench

            return run_enqueue_bench(
                self.redis_url, paths=o.paths, chunk_size=o.chunk_size, scan_files=o.scan_files, repeat=o.repeat
            )
        from imgpipe.bench.pipeline import run_pipeline_bench
        from imgpipe.scan import scan

        sources = sorted(Path(p) for p in scan(self.images()))
        return run_pipeline_bench(
            self.redis_url,
            sources,
            self.tmp / "pipeline",
            images=o.pipeline_images,
            max_batch=o.batch_size,
            max_wait_ms=self.settings.batch.max_wait_ms,
            decode_threads=o.decode_threads,
            device=o.device,
            model=o.model,
            repeat=o.repeat,
        )
