"""`imgpipe bench`: imgpipe against the script a user would write and against itself fed in other ways, side by
side on the same images, rounds interleaved, medians and ratios from one run.

Torch is imported only by the variants that need it, so `imgpipe bench --variants enqueue` runs on a producer host.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from imgpipe import threads
from imgpipe.bench.results import BenchError, HistogramCounts, Rounds
from imgpipe.bench.workloads import WORKLOADS, Workload
from imgpipe.errors import ConfigError
from imgpipe.scratch_redis import ScratchRedisError, scratch_redis
from imgpipe.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from imgpipe.bench.pipeline import Workers

VARIANTS = (
    "inprocess", "dataloader", "naive", "pipeline", "stream", "watch", "compute", "decode", "enqueue", "latency"
)  # fmt: skip
# What runs without --variants: every variant but latency (opt-in: paced feeds take as long as they take).
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "latency")
# Variants that need the scratch redis-server (skipped without one).
REDIS_VARIANTS = ("naive", "pipeline", "stream", "watch", "enqueue", "latency")
# The worker-fed variants of a workload (enqueue has its own synthetic paths).
QUEUE_VARIANTS = ("naive", "pipeline", "stream", "watch", "latency")
# latency: the p95 target of the adaptive workers per workload (ms, --latency-ms overrides), and the arrival
# rate of its paced one-path messages as a fraction of the fixed workers' measured one-path capacity.
LATENCY_TARGET_MS = {"digits": 50, "photos": 100}
LATENCY_LOAD = 0.6
# Seconds each worker set is watched idle for the CPU it uses without work (_Costs).
IDLE_S = 2.0
# The ratios the JSON reports: numerator variant / denominator variant, per workload.
RATIOS = (("inprocess", "dataloader"), ("pipeline", "inprocess"), ("stream", "inprocess"), ("pipeline", "naive"))
PEER = Path(__file__).with_name("peers") / "dataloader_script.py"
PEER_NUM_WORKERS = (0, 2)
LATENCY_METRIC, BATCH_METRIC = "imgpipe_image_latency_seconds", "imgpipe_batch_size"
END_TO_END_METRIC = "imgpipe_image_end_to_end_seconds"
HISTOGRAMS = (LATENCY_METRIC, END_TO_END_METRIC, BATCH_METRIC)  # read by the latency variant
WHAT = {
    "inprocess": "`imgpipe classify` path: scan, lanes that decode and infer whole batches, JSONL records",
    "dataloader": "peer: plain DataLoader script, same model and preprocessing (best of num_workers 0, 2)",
    "naive": "one Celery task per image, no batching (imgpipe worker, IMGPIPE_MAX_BATCH=1, 1 path/message)",
    "pipeline": "`imgpipe enqueue --wait` path: chunks of --chunk-size paths into warm workers",
    "stream": "the same images one path per message, as a third-party producer sends them",
    "watch": "files moved into a folder `imgpipe watch` streams, first landing to last record",
    "compute": "ceiling: the model alone on pre-decoded batches, from as many threads as lanes (Engine.predict; "
    "on CUDA through one model thread, padded, AMP, channels_last, pinned)",
    "decode": "ceiling: read + decode + preprocess alone, on the engine's decode threads",
}
LATENCY_SETS = ("fixed", "adaptive")


def parse_names(text: str, valid: tuple[str, ...], flag: str) -> list[str]:
    """The names in a comma-separated list, in their fixed order; ConfigError for an unknown one."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(valid))
    if unknown or not names:
        raise ConfigError(f"{flag} {text!r}: unknown {', '.join(unknown) or '(none)'}; valid: {', '.join(valid)}")
    return [name for name in valid if name in names]


@click.command()
@click.argument("data", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--workload",
    "workloads",
    default=",".join(WORKLOADS),
    show_default=True,
    help="digits (the demo PNGs, DATA if given) and/or photos (640x480 JPEGs, mobilenet_v3_small).",
)
@click.option(
    "--variants",
    default=",".join(DEFAULT_VARIANTS),
    show_default=True,
    help="Comma-separated variants to run (latency is opt-in: " + ",".join(VARIANTS) + ").",
)
@click.option("--images", default=4000, show_default=True, type=click.IntRange(min=1), help="digits: images.")
@click.option("--photos", default=300, show_default=True, type=click.IntRange(min=1), help="photos: images.")
@click.option(
    "--rounds",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Interleaved rounds; the median of each variant counts.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Warm `imgpipe worker` commands of the queue variants (each runs --concurrency processes).",
)
@click.option(
    "--concurrency",
    default=None,
    type=click.IntRange(min=1),
    help="Processes of each `imgpipe worker` [env IMGPIPE_CONCURRENCY; default: the worker's own, one per core "
    "on the CPU (as memory allows), one per GPU].",
)
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(min=1),
    help="Images per inference batch, every variant [env IMGPIPE_MAX_BATCH; default 64].",
)
@click.option(
    "--chunk-size",
    default=None,
    type=click.IntRange(min=1),
    help="pipeline, enqueue: paths per message [env IMGPIPE_CHUNK_SIZE; default 32].",
)
@click.option(
    "--paths",
    default=100_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="enqueue: synthetic paths per measurement.",
)
@click.option(
    "--latency-ms",
    default=None,
    type=click.IntRange(min=1),
    help="latency: p95 target of the adaptive workers [default: "
    + ", ".join(f"{k} {v}" for k, v in LATENCY_TARGET_MS.items())
    + "].",
)
@click.option("--device", default="cpu", show_default=True, help="Device of the engine and the workers.")
@click.option("--contention", is_flag=True, help="Keep one core busy with a CPU-bound process for the whole run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON here.")
@click.option(
    "--logs",
    "logs_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Copy the logs of the workers (and of watch) here at the end; otherwise they go with the scratch folder.",
)
def bench(
    data: Path | None,
    workloads: str,
    variants: str,
    images: int,
    photos: int,
    rounds: int,
    workers: int,
    concurrency: int | None,
    batch_size: int | None,
    chunk_size: int | None,
    paths: int,
    latency_ms: int | None,
    device: str,
    contention: bool,
    json_path: Path | None,
    logs_dir: Path | None,
) -> None:
    """Benchmark imgpipe side by side with the script a user would write, on the same generated images.

    \b
    inprocess   `imgpipe classify`'s path end to end (scan, decode, infer, write records), model warm
    dataloader  the peer: a plain torch DataLoader script (imgpipe/bench/peers/dataloader_script.py),
                same model file and preprocessing, best of num_workers 0 and 2, default threads
    naive       one Celery task per image, no batching (an `imgpipe worker` with IMGPIPE_MAX_BATCH=1)
    pipeline    `imgpipe enqueue --wait` into a scratch Redis with --workers warm `imgpipe worker`s
    stream      the same images as one-path messages, as a third-party producer sends them
    watch       files landing in a folder that `imgpipe watch` streams, timed to their records
    compute     ceiling: the model alone on pre-decoded tensors (what inference allows)
    decode      ceiling: reading, decoding and preprocessing alone (what the decode threads allow)
    enqueue     paths/s of the producer for --paths synthetic paths (against a plain send_task loop)
    latency     opt-in (--variants ...,latency): one-path messages sent at a steady rate, 0.6 of the
                one-path capacity measured at warm-up, to fixed batching (IMGPIPE_MAX_BATCH, MAX_WAIT_MS)
                and to adaptive batching (IMGPIPE_MAX_LATENCY_MS=--latency-ms); images/s, mean batch,
                latency p50/p95 from receipt to record (what the target bounds) and from the producer's
                send to record (the queue's wait included; the workers' histograms, warm-up excluded)

    Rounds are interleaved (A B C, A B C, ...) so that drift in the machine's load touches every variant
    alike; the medians and the ratios inprocess/dataloader, pipeline/inprocess, stream/inprocess and
    pipeline/naive are printed as a table and as one JSON line (and --json FILE). The queue variants start
    their own redis-server on a free loopback port (never IMGPIPE_REDIS_URL); without one they are skipped.
    """
    chosen_workloads = parse_names(workloads, WORKLOADS, "--workload")
    chosen = parse_names(variants, VARIANTS, "--variants")
    settings = Settings.from_env(sections=("model", "batch", "security", "producer", "worker"))
    from imgpipe.worker.cli import lanes_chosen, plan_devices

    processes = len(plan_devices(device, concurrency or settings.worker.concurrency))
    options = _Options(
        data=data,
        counts={"digits": images, "photos": photos},
        rounds=rounds,
        workers=workers,
        processes=processes,
        explicit_lanes=lanes_chosen({}),
        batch_size=batch_size or settings.batch.max_batch,
        chunk_size=chunk_size or settings.producer.chunk_size,
        paths=paths,
        latency_ms=latency_ms,
        device=device,
        digits_model=settings.model.resolved_path().absolute(),
        torch_threads=settings.batch.torch_threads,
        decode_threads=settings.batch.decode_threads,
        cpu_infer_batch=settings.batch.cpu_infer_batch,
        serial_decode_bytes=settings.batch.serial_decode_bytes,
    )
    cpus = threads.available_cpus()
    summary: dict[str, Any] = {
        "machine": {
            "cpus": cpus,
            "os_cpu_count": os.cpu_count(),
            "device": device,
            "contention": contention,
            "decode_threads": options.decode_threads,
            "torch_threads_cpu": options.torch_threads or threads.torch_threads("cpu", cpus, options.decode_threads),
        },
        "settings": {
            "rounds": rounds,
            "workers": workers,
            "processes_per_worker": processes,
            "batch_size": options.batch_size,
            "chunk_size": options.chunk_size,
        },
        "workloads": {},
    }
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgpipe-bench-")))
        if logs_dir is not None:  # runs when the workers have stopped, before the scratch folder goes
            stack.callback(_keep_logs, tmp, logs_dir)
        if contention:
            stack.enter_context(busy_core())
        redis_url: str | None = None
        if any(v in REDIS_VARIANTS for v in chosen):
            try:
                redis_url = stack.enter_context(scratch_redis(tmp / "redis"))
            except ScratchRedisError as exc:
                skipped = [v for v in chosen if v in REDIS_VARIANTS]
                click.echo(f"{', '.join(skipped)}: skipped: {exc}")
                summary["skipped"] = {v: str(exc) for v in skipped}
                chosen = [v for v in chosen if v not in REDIS_VARIANTS]
        try:
            for name in chosen_workloads:
                image_variants = [v for v in chosen if v != "enqueue"]
                if image_variants:
                    result = _run_workload(name, tmp, options, image_variants, redis_url)
                    summary["workloads"][name] = result
                    click.echo(_table(name, result) + "\n")
            if "enqueue" in chosen:
                assert redis_url is not None
                summary["enqueue"] = _run_enqueue(redis_url, options)
        except BenchError as exc:
            raise click.ClickException(str(exc)) from None
    text = json.dumps(summary)
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(text)


def _keep_logs(tmp: Path, logs_dir: Path) -> None:
    """Copy every log under the scratch folder ``tmp`` to ``logs_dir``, named by its path there (a/b.log: a-b.log)."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    for log_file in sorted(tmp.rglob("*.log")):
        shutil.copyfile(log_file, logs_dir / "-".join(log_file.relative_to(tmp).parts))


@dataclass(frozen=True)
class _Options:
    data: Path | None
    counts: dict[str, int]
    rounds: int
    workers: int
    processes: int  # of each worker command (IMGPIPE_CONCURRENCY)
    explicit_lanes: bool  # IMGPIPE_DECODE_THREADS was set: every worker process gets that many lanes
    batch_size: int
    chunk_size: int
    paths: int
    latency_ms: int | None
    device: str
    digits_model: Path
    torch_threads: int
    decode_threads: int
    cpu_infer_batch: int
    serial_decode_bytes: int


def _progress(workload: str, round_: int, rounds: int, variant: str, rate: float) -> None:
    click.echo(f"{workload} round {round_}/{rounds}: {variant:<16} {rate:9.1f} images/s", err=True)


def _run_workload(name: str, tmp: Path, o: _Options, variants: list[str], redis_url: str | None) -> dict[str, Any]:
    """Every chosen variant on workload ``name``, rounds interleaved; the workload's JSON entry."""
    from imgpipe.bench.workloads import prepare

    click.echo(f"{name}: preparing {o.counts[name]} images", err=True)
    workload = prepare(name, tmp, o.counts[name], o.data if name == "digits" else None, o.digits_model)
    runners: dict[str, Callable[[], float]] = {}
    rounds = Rounds()
    costs = _Costs(workload.count)
    info: dict[str, Any] = {}
    rss_before: tuple[float, float] | None = None  # the batched workers' (largest, all) MB before the rounds
    images_before = 0  # and the images they had classified then
    largest_by_round: list[float] = []  # their largest process's MB after each round
    with ExitStack() as stack:
        if "inprocess" in variants:
            runners["inprocess"] = costs.local("inprocess", _inprocess(workload, tmp, o))
        if "compute" in variants or "decode" in variants:
            compute, decode = _ceilings(workload, o)
            if "compute" in variants:
                runners["compute"] = compute
            if "decode" in variants:
                runners["decode"] = decode
        if "dataloader" in variants:
            for workers in PEER_NUM_WORKERS:
                runners[f"dataloader_w{workers}"] = _peer(workload, tmp, o, workers)
        queue_variants = [v for v in variants if v in QUEUE_VARIANTS]
        if queue_variants:
            assert redis_url is not None
            from imgpipe.bench.pipeline import Workers

            common: dict[str, Any] = {"count": o.workers, "model": workload.model, "roots": workload.images.parent}
            # Each worker command as a user starts it: its processes share the cores (worker/cli.py share_cores)
            # unless the lanes were chosen.
            env = {f"{ENV_PREFIX}DEVICE": o.device, f"{ENV_PREFIX}CONCURRENCY": str(o.processes)}
            if o.explicit_lanes:
                env[f"{ENV_PREFIX}DECODE_THREADS"] = str(o.decode_threads)
            if o.torch_threads:
                env[f"{ENV_PREFIX}TORCH_THREADS"] = str(o.torch_threads)
            env[f"{ENV_PREFIX}CPU_INFER_BATCH"] = str(o.cpu_infer_batch)
            env[f"{ENV_PREFIX}SERIAL_DECODE_BYTES"] = str(o.serial_decode_bytes)
            sets = {}
            if "naive" in queue_variants:
                sets["naive"] = stack.enter_context(
                    Workers(redis_url, 1, tmp / name / "naive", **common, env={**env, f"{ENV_PREFIX}MAX_BATCH": "1"})
                )
            if set(queue_variants) - {"naive"}:
                sets["batched"] = stack.enter_context(
                    Workers(redis_url, 0, tmp / name / "batched", **common,
                            env={**env, f"{ENV_PREFIX}MAX_BATCH": str(o.batch_size)})
                )  # fmt: skip
            latency: _LatencyRuns | None = None
            if "latency" in queue_variants:
                target_ms = o.latency_ms or LATENCY_TARGET_MS[name]
                adaptive = stack.enter_context(
                    Workers(redis_url, 2, tmp / name / "adaptive", **common,
                            env={**env, f"{ENV_PREFIX}MAX_BATCH": str(o.batch_size),
                                 f"{ENV_PREFIX}MAX_LATENCY_MS": str(target_ms)})
                )  # fmt: skip
                adaptive.wait_ready()
                latency = _LatencyRuns(workload.images, {"fixed": sets["batched"], "adaptive": adaptive}, target_ms)
            for workers_set in sets.values():
                workers_set.wait_ready()
            for set_name, workers_set in sets.items():  # warm-up: page cache, TorchScript executor, connections
                workers_set.run_job(workload.images, o.batch_size if set_name == "batched" else 1)
            if latency is not None:
                latency.warm_up()
                for key in LATENCY_SETS:
                    runners[f"latency_{key}"] = latency.runner(key)
            if "naive" in sets:
                runners["naive"] = costs.runner(
                    "naive", sets["naive"], lambda: sets["naive"].run_job(workload.images, 1)
                )
            if "pipeline" in queue_variants:
                runners["pipeline"] = costs.runner(
                    "pipeline", sets["batched"], lambda: sets["batched"].run_job(workload.images, o.chunk_size)
                )
            if "stream" in queue_variants:
                runners["stream"] = costs.runner(
                    "stream", sets["batched"], lambda: sets["batched"].run_job(workload.images, 1)
                )
            if "watch" in queue_variants:
                watched = iter(range(1_000_000))
                runners["watch"] = lambda: sets["batched"].run_watch(
                    workload.images, workload.images.parent / f"watched-{next(watched)}"
                )
            batch_before = {k: s.mean_batch() for k, s in sets.items()}
            if "batched" in sets:
                rss_before, images_before = sets["batched"].rss_mb(), sets["batched"].images_classified()
        for round_ in range(1, o.rounds + 1):
            for variant, run in runners.items():
                rate = run()
                rounds.add(variant, rate)
                _progress(name, round_, o.rounds, variant, rate)
            if rss_before is not None and (now := sets["batched"].rss_mb()) is not None:
                largest_by_round.append(now[0])
        if queue_variants:
            mean_batch = {}
            for key, workers_set in sets.items():
                total, count = workers_set.mean_batch()
                before = batch_before[key]
                if key == "batched" and latency is not None:  # without the paced runs, reported on their own
                    paced = latency.counts["fixed"][BATCH_METRIC]
                    total, count = total - paced.sum, count - paced.count
                if count > before[1]:
                    mean_batch[key] = round((total - before[0]) / (count - before[1]), 1)
            info["mean_batch"] = mean_batch
            rss_after = sets["batched"].rss_mb() if rss_before is not None else None
            if rss_before is not None and rss_after is not None:
                # Whether the workers' memory stays flat over the measured rounds (it must not grow per image).
                info["worker_rss_mb"] = {
                    "largest_before": rss_before[0], "largest_after": rss_after[0],
                    "total_before": rss_before[1], "total_after": rss_after[1],
                    "images": sets["batched"].images_classified() - images_before,
                    "largest_by_round": largest_by_round,
                }  # fmt: skip
            if costs.stages():
                info["stage_ms"] = costs.stages()
            if latency is not None:
                info["latency"] = latency.summary(rounds)
    if any(v in costs.per_image for v in QUEUE_VARIANTS):  # with the queue's, the in-process cost to compare
        info["cpu_us_per_image"] = costs.summary()
        if cpu_bound := costs.cpu_bound_ratios():
            info["cpu_bound_ratios"] = cpu_bound
    rates: dict[str, float] = {}
    measured = [v for v in runners if not v.startswith("latency_")]  # the paced runs: in info["latency"]
    for variant in measured:
        median = rounds.median(variant)
        assert median is not None  # every runner ran in every round
        rates[variant] = round(median, 1)
    if "dataloader" in variants:  # the peer's best, listed right after its two measurements
        best = max(rates[f"dataloader_w{w}"] for w in PEER_NUM_WORKERS)
        order = list(rates)
        after = order.index(f"dataloader_w{PEER_NUM_WORKERS[-1]}") + 1
        rates = {**dict(list(rates.items())[:after]), "dataloader": best, **dict(list(rates.items())[after:])}
    ratios = {f"{a}/{b}": round(rates[a] / rates[b], 2) if a in rates and b in rates else None for a, b in RATIOS}
    per_round = {v: [round(r, 1) for r in rounds.rates[v]] for v in measured}
    paired = paired_ratios(per_round)  # from the rates the JSON shows, so that anyone can check them
    if "compute" in rates and "decode" in rates and "inprocess" in rates:
        bound = "compute" if rates["compute"] < rates["decode"] else "decode"
        info["bound"] = bound  # the ceiling that limits the pipeline, and how close inprocess gets to it
        info["inprocess_of_ceiling"] = round(rates["inprocess"] / rates[bound], 2)
    if "pipeline" in rates and "stream" in rates:
        # Extra cost of a one-path message over a chunk's share of one: the per-message overhead.
        per_image = 1 / rates["stream"] - 1 / rates["pipeline"]
        info["per_message_overhead_us"] = round(per_image * 1e6 / (1 - 1 / o.chunk_size), 1)
    return {
        "images": workload.count,
        "what": workload.what,
        "model": workload.model.name,
        "rates": rates,
        "ratios": ratios,
        "paired_ratios": paired,
        "rounds": per_round,
        **info,
    }


def paired_ratios(per_round: dict[str, list[float]]) -> dict[str, dict[str, float] | None]:
    """Each ratio of RATIOS taken within each round (the variants ran minutes apart at most, interleaved), as
    {median, low, high} over the rounds; None where a variant did not run. Beside the ratios of the medians:
    a round where the machine slowed down slows both sides of its ratio, so these move less between runs. The
    peer's round is the best of its num_workers in that round."""
    rates = dict(per_round)
    peers = [per_round.get(f"dataloader_w{w}") for w in PEER_NUM_WORKERS]
    if all(peers):
        rates["dataloader"] = [max(values) for values in zip(*peers, strict=True)]
    out: dict[str, dict[str, float] | None] = {}
    for a, b in RATIOS:
        if not rates.get(a) or not rates.get(b):
            out[f"{a}/{b}"] = None
            continue
        each = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        out[f"{a}/{b}"] = {
            "median": round(statistics.median(each), 2),
            "low": round(min(each), 2),
            "high": round(max(each), 2),
        }
    return out


class _Costs:
    """CPU per image of the queue variants, per round: the worker commands' processes and the scratch Redis
    (what one Redis core serves is what caps a cluster of workers that share it), less what each uses idle
    (heartbeats, the reconciler, blocked fetches timing out, Redis's own timers), measured once per worker set
    before its first measured run: on a slow workload that idle share would otherwise count as the images' cost."""

    def __init__(self, images: int) -> None:
        self.images = images
        self.per_image: dict[str, dict[str, list[float]]] = {}
        self._idle: dict[Workers, dict[str, float]] = {}  # per worker set: CPU seconds per second when idle
        # {variant: {stage: [mean ms per observation, one per round]}} from the workers' stage histograms
        # (decode: per image, on one lane; infer: per batch; write: per write): where the workers' time went.
        self.stage_ms: dict[str, dict[str, list[float]]] = {}

    def local(self, variant: str, run: Callable[[], float]) -> Callable[[], float]:
        """``run`` (a variant that runs in this process: inprocess) with this process's CPU per image."""

        def costed() -> float:
            before = time.process_time()
            rate = run()
            used = time.process_time() - before
            self.per_image.setdefault(variant, {}).setdefault("process", []).append(used / self.images * 1e6)
            return rate

        return costed

    def runner(self, variant: str, workers_set: Workers, run: Callable[[], float]) -> Callable[[], float]:
        def costed() -> float:
            idle = self._idle.get(workers_set)
            if idle is None:
                idle = self._idle[workers_set] = self._idle_rates(workers_set)
            stages_before = workers_set.stage_totals()
            before, start = workers_set.cpu_seconds(), time.perf_counter()
            own = time.process_time()  # this process: the producer's sends and the job's polling
            rate = run()
            own = time.process_time() - own
            after, seconds = workers_set.cpu_seconds(), time.perf_counter() - start
            stages = self.stage_ms.setdefault(variant, {})
            for stage, (stage_s, count) in workers_set.stage_totals().items():
                had_s, had_count = stages_before.get(stage, (0.0, 0.0))
                if count > had_count:
                    stages.setdefault(stage, []).append((stage_s - had_s) / (count - had_count) * 1e3)
            seen = self.per_image.setdefault(variant, {})
            for part, used in after.items():
                first = before[part]
                if used is not None and first is not None:
                    work = max(0.0, used - first - idle.get(part, 0.0) * seconds)
                    seen.setdefault(part, []).append(work / self.images * 1e6)
            seen.setdefault("producer", []).append(own / self.images * 1e6)
            return rate

        return costed

    @staticmethod
    def _idle_rates(workers_set: Workers) -> dict[str, float]:
        before = workers_set.cpu_seconds()
        time.sleep(IDLE_S)
        after = workers_set.cpu_seconds()
        return {
            part: (used - first) / IDLE_S
            for part, used in after.items()
            if used is not None and (first := before[part]) is not None
        }

    def summary(self) -> dict[str, dict[str, float]]:
        """{variant: {part: median microseconds per image}}."""
        return {
            variant: {part: round(statistics.median(values), 1) for part, values in parts.items()}
            for variant, parts in self.per_image.items()
        }

    def cpu_bound_ratios(self) -> dict[str, float]:
        """{"pipeline/inprocess": ..., "stream/inprocess": ...}: the in-process engine's CPU per image over a
        queue variant's (workers, Redis and producer together). Where each side gets the same cores (a busy
        host, ``--contention``) the CPU decides, and the measured ratio comes to about this; on an idle host a
        variant that keeps more cores busy can run above it (the in-process engine's one GIL holds it to about
        1.7 of 2 cores on the digits)."""
        summary = self.summary()
        base = summary.get("inprocess", {}).get("process")
        if not base:
            return {}
        out = {}
        for variant in ("pipeline", "stream"):
            parts = summary.get(variant)
            if parts and sum(parts.values()) > 0:
                out[f"{variant}/inprocess"] = round(base / sum(parts.values()), 2)
        return out

    def stages(self) -> dict[str, dict[str, float]]:
        """{variant: {stage: median of the rounds' mean ms}} (decode per image, infer per batch, write per write)."""
        return {
            variant: {stage: round(statistics.median(values), 3) for stage, values in stages.items()}
            for variant, stages in self.stage_ms.items()
            if stages
        }


class _LatencyRuns:
    """The latency variant: the images as one-path messages at a steady arrival rate (LATENCY_LOAD of the
    one-path capacity the fixed workers show at warm-up) into each worker set, fixed and adaptive; per set,
    the worker's batch size and receipt-to-record latency histograms summed over the measured runs only."""

    def __init__(self, images: Path, sets: dict[str, Workers], target_ms: int) -> None:
        self.images = images
        self.sets = sets
        self.target_ms = target_ms
        self.capacity = 0.0
        self.arrival = 0.0
        # Per set, each histogram summed over the measured runs only.
        self.counts = {key: {name: HistogramCounts({}) for name in HISTOGRAMS} for key in sets}

    def warm_up(self) -> None:
        """One unpaced one-path run into each set (the fixed set's is the capacity), one paced run into each."""
        self.capacity = self.sets["fixed"].run_job(self.images, 1)
        self.sets["adaptive"].run_job(self.images, 1)
        self.arrival = LATENCY_LOAD * self.capacity
        for workers_set in self.sets.values():  # the adaptive sizer settles on the paced feed
            workers_set.run_paced(self.images, self.arrival)

    def runner(self, key: str) -> Callable[[], float]:
        workers_set = self.sets[key]

        def run() -> float:
            before = workers_set.histograms(HISTOGRAMS)
            rate = workers_set.run_paced(self.images, self.arrival)
            after = workers_set.histograms(HISTOGRAMS)
            for name in HISTOGRAMS:
                self.counts[key][name] += after[name] - before[name]
            return rate

        return run

    def summary(self, rounds: Rounds) -> dict[str, Any]:
        result: dict[str, Any] = {
            "target_ms": self.target_ms,
            "load": LATENCY_LOAD,
            "capacity": round(self.capacity, 1),
            "arrival_rate": round(self.arrival, 1),
        }
        for key in self.sets:
            median = rounds.median(f"latency_{key}")
            assert median is not None  # every runner ran in every round
            counts = self.counts[key]
            mean_batch = counts[BATCH_METRIC].mean()
            result[key] = {
                "rate": round(median, 1),
                "mean_batch": None if mean_batch is None else round(mean_batch, 1),
                **_quantiles_ms("", counts[LATENCY_METRIC]),
                **_quantiles_ms("end_to_end_", counts[END_TO_END_METRIC]),
                "rounds": [round(r, 1) for r in rounds.rates[f"latency_{key}"]],
            }
        return result


def _engine(workload: Workload, o: _Options) -> Any:
    """The engine of ``workload``'s model, loaded as `imgpipe classify` loads it with the bench's settings."""
    from imgpipe.model.engine import Engine

    return Engine.load(
        workload.model,
        o.device,
        torch_threads=o.torch_threads,
        lanes=o.decode_threads,
        cpu_infer_batch=o.cpu_infer_batch,
        serial_decode_bytes=o.serial_decode_bytes,
        warm_batch=o.batch_size,
    )


def _inprocess(workload: Workload, tmp: Path, o: _Options) -> Callable[[], float]:
    """`imgpipe classify FOLDER -o out.jsonl` in this process, with its model loaded once (warm)."""
    from imgpipe import heap
    from imgpipe.model.cli import expand_paths
    from imgpipe.records import RecordWriter

    engine = _engine(workload, o)
    heap.settle()  # as `imgpipe classify` does once its model is loaded (model/cli.py load_engine)
    out = tmp / workload.name / "inprocess.jsonl"

    def run() -> float:
        start = time.perf_counter()
        with open(out, "w", encoding="utf-8", newline="") as stream:
            writer = RecordWriter(stream, "jsonl")
            count = 0
            inputs = list(expand_paths((str(workload.images),)))
            for record in engine.classify(inputs, batch_size=o.batch_size, lanes=o.decode_threads):
                writer.write(record)
                count += record["status"] == "ok"
        if count != workload.count:
            raise BenchError(f"inprocess: {count} of {workload.count} images classified")
        return count / (time.perf_counter() - start)

    run()  # warm-up: page cache and the TorchScript executor
    return run


def _ceilings(workload: Workload, o: _Options) -> tuple[Callable[[], float], Callable[[], float]]:
    """Runners for the two ceilings of the in-process engine: inference alone on batches decoded beforehand
    (the inputs cycle over the first batch_size images), from as many threads at once as ``classify`` has
    lanes, and decoding alone on that many threads."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from imgpipe.model.preprocess import stack

    engine = _engine(workload, o)
    paths = sorted(str(p) for p in workload.images.iterdir())
    batch = stack([engine.load_image(p) for p in paths[: o.batch_size]])  # (B, C, H, W), decoded once
    batches = -(-workload.count // o.batch_size)

    def compute() -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=o.decode_threads) as pool:
            for _ in pool.map(lambda _i: engine.predict(batch), range(batches)):
                pass
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return batches * batch.shape[0] / (time.perf_counter() - start)

    def decode() -> float:
        threads_ = o.decode_threads
        step = -(-len(paths) // threads_)
        slices = [paths[i : i + step] for i in range(0, len(paths), step)]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads_) as pool:
            decoded = sum(len(part) for part in pool.map(lambda s: [engine.safe_load_image(p) for p in s], slices))
        return decoded / (time.perf_counter() - start)

    compute()  # warm-up
    return compute, decode


def _peer(workload: Workload, tmp: Path, o: _Options, num_workers: int) -> Callable[[], float]:
    """The DataLoader peer script in a child process with a user's environment (no IMGPIPE_*, no OpenMP
    policy of ours); the rate over its own timed loop (interpreter start, imports, model load not counted)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "OMP_WAIT_POLICY"}
    out = tmp / workload.name / f"peer-w{num_workers}.jsonl"
    argv = [sys.executable, str(PEER), str(workload.model), str(workload.images)]
    argv += ["--batch-size", str(o.batch_size), "--num-workers", str(num_workers), "-o", str(out)]
    from imgpipe.model.engine import select_device

    argv += ["--device", str(select_device(o.device))]  # "auto" resolved as the engine resolves it

    def run() -> float:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
        if done.returncode != 0:
            raise BenchError(f"dataloader peer (num_workers={num_workers}) failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if result["images"] != workload.count:
            raise BenchError(f"dataloader peer: {result['images']} of {workload.count} images")
        return float(result["images"]) / float(result["seconds"])

    return run


def _run_enqueue(redis_url: str, o: _Options) -> dict[str, Any]:
    from imgpipe.bench.enqueue import run_enqueue_bench

    click.echo(f"enqueue: {o.paths} paths, {o.rounds} rounds", err=True)
    result = run_enqueue_bench(redis_url, paths=o.paths, chunk_size=o.chunk_size, scan_files=1000, repeat=o.rounds)
    click.echo(result.table() + "\n")
    return result.summary()


def _table(name: str, result: dict[str, Any]) -> str:
    rates, rounds = result["rates"], result.get("rounds", {})
    lines = [
        f"{name}: {result['what']}; medians of interleaved rounds (and their range: how much the machine moved)",
        f"  {'variant':<14} {'images/s':>10} {'range':>17}  what",
    ]
    for variant, rate in rates.items():
        what = WHAT.get(
            variant, "num_workers=" + variant.rsplit("w", 1)[-1] if variant.startswith("dataloader_") else ""
        )
        seen = rounds.get(variant) or []
        spread = f"{min(seen):.0f}-{max(seen):.0f}" if len(seen) > 1 else ""
        lines.append(f"  {variant:<14} {rate:10.1f} {spread:>17}  {what}")
    paired = result.get("paired_ratios", {})
    for ratio, value in result["ratios"].items():
        each = paired.get(ratio)
        rounds_note = f"   per round {each['median']:.2f} ({each['low']:.2f}-{each['high']:.2f})" if each else ""
        lines.append(f"  {ratio:<22} {'-' if value is None else f'{value:.2f}'}{rounds_note}")
    if "bound" in result:
        lines.append(f"  bound by {result['bound']:<12} inprocess at {result['inprocess_of_ceiling']:.2f} of it")
    if "per_message_overhead_us" in result:
        overhead = result["per_message_overhead_us"]
        told = f"{overhead:.0f} us" if overhead > 0 else f"{overhead:.0f} us: below the noise (one path ran as fast)"
        lines.append(f"  per-message overhead   {told}")
    for variant, parts in result.get("cpu_us_per_image", {}).items():
        redis_us = parts.get("redis", 0.0)
        cells = [f"{part} {used:.0f}" for part, used in parts.items()]
        ceiling = f"; one Redis core: {1e6 / redis_us:,.0f} images/s" if redis_us > 0 else ""
        lines.append(f"  cpu us/image {variant:<9} {', '.join(cells)}{ceiling}")
    if result.get("cpu_bound_ratios"):
        cells = [f"{ratio} {value:.2f}" for ratio, value in result["cpu_bound_ratios"].items()]
        lines.append(
            f"  cpu-bound ratios       {', '.join(cells)}  (CPU per image alone: where each side has the same cores)"
        )
    if "worker_rss_mb" in result:
        rss = result["worker_rss_mb"]
        by_round = rss["largest_by_round"]
        lines.append(
            f"  worker rss MB          largest process {rss['largest_before']:.0f} -> {rss['largest_after']:.0f}"
            f" (after round 1: {by_round[0]:.0f}), all {rss['total_before']:.0f} -> {rss['total_after']:.0f}"
            f" over {rss['images']:,} images (the batched workers, measured rounds)"
        )
    for variant, stages in result.get("stage_ms", {}).items():
        cells = [f"{stage} {stages[stage]:.2f}" for stage in ("decode", "infer", "write") if stage in stages]
        what = "(decode per image, infer per batch, write per write)"
        lines.append(f"  worker ms {variant:<12} {', '.join(cells)}  {what}")
    if "latency" in result:
        lat = result["latency"]
        lines.append(
            f"  latency: one-path messages at {lat['load']} x {lat['capacity']:.0f} = {lat['arrival_rate']:.0f}/s"
            f" (of the one-path capacity); adaptive p95 target {lat['target_ms']} ms"
        )
        lines.append(
            "    latency from message receipt to record (the target's), and end to end from the producer's send,"
            " from the workers' histogram buckets, warm-up excluded"
        )
        lines.append(
            f"    {'batching':<10} {'images/s':>10} {'mean batch':>11} {'p50 ms':>8} {'p95 ms':>8}"
            f" {'send p50':>9} {'send p95':>9}"
        )
        for key in LATENCY_SETS:
            row = lat[key]
            cells = [
                _number(row[k], 1) for k in ("mean_batch", "p50_ms", "p95_ms", "end_to_end_p50_ms", "end_to_end_p95_ms")
            ]
            lines.append(
                f"    {key:<10} {row['rate']:10.1f} {cells[0]:>11} {cells[1]:>8} {cells[2]:>8} {cells[3]:>9}"
                f" {cells[4]:>9}"
            )
    return "\n".join(lines)


def _quantiles_ms(prefix: str, counts: HistogramCounts) -> dict[str, float | None]:
    """p50 and p95 of ``counts`` in ms, under ``prefix``p50_ms and ``prefix``p95_ms (None when empty)."""
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p95", 0.95)):
        value = counts.quantile(q)
        out[f"{prefix}{name}_ms"] = None if value is None else round(value * 1000, 1)
    return out


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@contextmanager
def busy_core() -> Iterator[None]:
    """A CPU-bound process pinned to the last core this process may use, for the duration; it also stops by
    itself when this process is gone (a bench killed mid-run must not leave a core busy)."""
    core = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    code = (
        f"import os\ntry: os.sched_setaffinity(0, {{{core}}})\nexcept Exception: pass\n"
        f"while os.getppid() == {os.getpid()}:\n    for _ in range(1000000): pass"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        yield
    finally:
        proc.kill()
        proc.wait(timeout=30)
