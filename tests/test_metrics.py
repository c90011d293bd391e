"""Worker metrics and the Redis exporter: multiprocess sums, live gauges, bounded labels, backlog and drain time."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from imgpipe import keys
from imgpipe.errors import ConfigError, ImageError
from imgpipe.jobs import RateWindow, drain_seconds, read_jobs
from imgpipe.procs import ProcessError, imgpipe_argv, wait_until
from imgpipe.registry import WorkerInfo, write_heartbeat
from imgpipe.settings import MetricsSettings, RedisSettings
from imgpipe.worker import metrics, metrics_server
from imgpipe.worker.exporter import MAX_MODEL_QUEUES, QueueSnapshot, RedisCollector, queue_keys, queues_to_report
from tests.conftest import REPO, cli_env, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:PORT/metrics, keyed by (sample name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def imgpipe_samples(samples: Samples) -> Samples:
    return {k: v for k, v in samples.items() if k[0].startswith("imgpipe_")}


# --- recent rate and drain time (pure) -----------------------------------------------------------------------


def test_rate_window_compares_jobs_one_by_one() -> None:
    window = RateWindow(window=60)
    assert window.rate() is None
    window.add(1000.0, {"a": 10, "old": 500})
    window.add(1000.5, {"a": 11, "old": 500})
    assert window.rate() is None  # under a second of history says nothing
    # "old" expires from Redis (no negative rate); "b" appears and counts from zero.
    window.add(1010.0, {"a": 40, "b": 20})
    assert window.rate() == pytest.approx((30 + 20) / 10)
    assert window.rate("a") == pytest.approx(3.0)
    assert window.rate("b") == pytest.approx(2.0)
    # After the window has passed, the base moves: only the last 60 s count.
    window.add(1070.0, {"a": 100, "b": 20})
    window.add(1090.0, {"a": 100, "b": 20})
    assert window.rate() == pytest.approx((100 - 40) / (1090 - 1010))
    window.add(1200.0, {"a": 100, "b": 20})
    assert window.rate() == 0.0


def test_drain_seconds() -> None:
    assert drain_seconds(0, None) == 0.0
    assert drain_seconds(0, 0.0) == 0.0
    assert drain_seconds(120, 4.0) == 30.0
    assert drain_seconds(120, 0.0) == math.inf
    assert drain_seconds(120, None) == math.inf


# --- the exporter against a real Redis ------------------------------------------------------------------------


def write_job(
    client: redis.Redis,
    job_id: str,
    *,
    total: int,
    done: int,
    failed: int,
    created: float,
    sealed: bool = True,
    finished: float | None = None,
) -> None:
    """A job hash laid out as imgpipe/jobs.py writes it (create_job, add_to_total, seal) plus worker counts."""
    mapping: dict[str | bytes, str | int] = {
        "created": f"{created:.6f}",
        "total": total,
        "done": done,
        "failed": failed,
        "sealed": int(sealed),
        "kind": "batch",
        "roots": json.dumps(["/data"]),
    }
    if finished is not None:
        mapping["finished"] = f"{finished:.6f}"
    client.hset(keys.job(job_id), mapping=mapping)
    client.zadd(keys.JOBS, {job_id: created})


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_exporter_figures_from_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    write_job(client, "job-a", total=100, done=10, failed=0, created=now - 30)
    write_job(client, "job-b", total=50, done=48, failed=2, created=now - 600, finished=now - 300)
    write_job(client, "job-c", total=7, done=0, failed=0, created=now - 5, sealed=False)
    depth, prio = queue_keys("imgpipe")[0], queue_keys("imgpipe")[-1]
    client.rpush(depth, "m1", "m2", "m3")
    client.rpush(prio, "m4")
    client.hset("unacked", mapping={"tag1": "x", "tag2": "y"})
    client.rpush(keys.DEAD_LETTER, json.dumps({"job": "job-a", "reason": "worker lost"}))

    clock = Clock(now)
    collector = RedisCollector(client, "imgpipe", window=60, clock=clock)
    first = collector.sample()
    assert (first.queue_depth, first.unacked, first.dead_letters) == (4, 2, 1)
    assert first.jobs_active == 2 and first.backlog == 90 + 7
    assert first.rate is None and first.drain is None  # one sample: no rate yet
    assert first.oldest_active_age == pytest.approx(30, abs=0.01)

    client.hset(keys.job("job-a"), mapping={"done": 30, "failed": 2})
    client.hset(keys.job("job-c"), mapping={"done": 3})
    clock.now = now + 10
    server = metrics_server.start_metrics_server(MetricsSettings(port=0, bind="127.0.0.1"), [collector], worker=False)
    assert server is not None
    try:
        samples = scrape(server.port)  # the scrape itself takes the second sample
    finally:
        server.close()
    rate = (22 + 3) / 10
    assert value(samples, metrics.REDIS_UP) == 1
    assert value(samples, metrics.QUEUE_DEPTH, queue="imgpipe") == 4
    assert value(samples, metrics.QUEUE_UNACKED) == 2
    assert value(samples, metrics.DEAD_LETTER_MESSAGES) == 1
    assert value(samples, metrics.JOBS_ACTIVE) == 2
    assert value(samples, metrics.BACKLOG_IMAGES) == 68 + 4
    assert value(samples, metrics.RECENT_RATE) == pytest.approx(rate)
    assert value(samples, metrics.DRAIN_SECONDS) == pytest.approx(72 / rate)
    # No job pinned, no worker: the default queue is the only one, and its figures are the totals.
    assert value(samples, metrics.QUEUE_BACKLOG_IMAGES, queue="imgpipe") == 72
    assert value(samples, metrics.QUEUE_DRAIN_SECONDS, queue="imgpipe") == pytest.approx(72 / rate)
    assert value(samples, metrics.QUEUE_WORKER_HOSTS, queue="imgpipe") == 0
    # Per-job numbers are totals only: the one label an exporter sample carries is the queue, so no job id can
    # leak into one.
    assert {label for (_name, labels) in imgpipe_samples(samples) for label, _ in labels} == {"queue"}
    # Nothing of the worker's own metrics in the exporter's endpoint (it would count as a worker).
    assert not any(name.startswith("imgpipe_images") for name, _ in samples)


def test_exporter_collector_can_join_a_worker_endpoint(redis_url: str) -> None:
    """A worker may serve the queue figures itself: its metrics and the collector's side by side, no clash."""
    client = redis.Redis.from_url(redis_url)
    client.rpush("imgpipe", "m1")
    collector = RedisCollector(client, "imgpipe")
    server = metrics_server.start_metrics_server(MetricsSettings(port=0, bind="127.0.0.1"), [collector])
    assert server is not None
    try:
        samples = scrape(server.port)
    finally:
        server.close()
    assert value(samples, metrics.QUEUE_DEPTH, queue="imgpipe") == 1
    assert ("imgpipe_images_total", frozenset({("status", "ok")})) in samples


def test_exporter_reports_each_queue(redis_url: str) -> None:
    """Per queue: a pinned job's backlog, rate and drain on its model queue, the hosts of live workers consuming
    each queue, and a model queue that holds messages though nothing names it (found by SCAN, not KEYS)."""
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    served, orphan, stuck = keys.model_queue("aaaaaaaaaaaa"), keys.model_queue("bbbbbbbbbbbb"), "cccccccccccc"
    write_job(client, "plain", total=100, done=0, failed=0, created=now - 10)
    write_job(client, "pinned", total=40, done=0, failed=0, created=now - 10)
    write_job(client, "nobody", total=5, done=0, failed=0, created=now - 10)
    client.hset(keys.job("pinned"), "pin", "resnet@aaaaaaaaaaaa")
    client.hset(keys.job("nobody"), "pin", f"other@{stuck}")
    client.rpush(queue_keys(served)[0], "m1", "m2")
    client.rpush(queue_keys(orphan)[-1], "m3")  # a priority list only
    for pid, host in ((1, "pod-a"), (2, "pod-a"), (3, "pod-b")):  # two processes on pod-a count as one host
        info = WorkerInfo(f"w{pid}", host, pid, "resnet@aaaaaaaaaaaa", "cpu", ("imgpipe", served), now, seen=now)
        write_heartbeat(client, info)
    write_heartbeat(client, WorkerInfo("odd", "pod-c", 9, "m@x", "cpu", ("/etc/passwd",), now, seen=now))
    for i in range(3000):  # SCAN steps through these, not KEYS
        client.set(f"filler:{i}", 1)

    clock = Clock(now)
    collector = RedisCollector(client, "imgpipe", clock=clock)
    first = collector.sample()
    for _ in range(20):  # the orphan is found within a few samples, one SCAN step each
        if keys.model_queue("bbbbbbbbbbbb") in collector.sample().queues:
            break
    client.hset(keys.job("pinned"), "done", 20)
    clock.now += 10
    snap = collector.sample()
    assert list(first.queues)[:2] == ["imgpipe", served]
    assert set(snap.queues) == {"imgpipe", served, orphan, keys.model_queue(stuck)}
    assert snap.queues[served] == QueueSnapshot(depth=2, backlog=20, rate=2.0, drain=10.0, worker_hosts=2)
    assert snap.queues["imgpipe"] == QueueSnapshot(depth=0, backlog=100, rate=0.0, drain=math.inf, worker_hosts=2)
    assert snap.queues[orphan] == QueueSnapshot(depth=1, backlog=0, rate=0.0, drain=0.0, worker_hosts=0)
    assert snap.queues[keys.model_queue(stuck)].worker_hosts == 0 and snap.queues[keys.model_queue(stuck)].backlog == 5
    assert snap.queue_depth == 3 and snap.backlog == 125 and snap.rate == 2.0
    # Emptied and named by nothing: the orphan is no longer reported.
    client.delete(queue_keys(orphan)[-1])
    clock.now += 1
    collector.sample()
    assert orphan not in collector.sample().queues


def test_exporter_reports_a_bounded_set_of_queues() -> None:
    many = [keys.model_queue(f"{i:012x}") for i in range(MAX_MODEL_QUEUES + 10)]
    reported = queues_to_report("imgpipe", ["/data/x", "imgpipe", *many[:5]], [*many, "imgpipe:model:nothex"])
    assert reported[0] == "imgpipe" and len(reported) == 1 + MAX_MODEL_QUEUES
    assert set(many[:5]) <= set(reported) and all("/" not in q and "nothex" not in q for q in reported)


def test_every_refusal_reason_and_resend_cause_is_initialised() -> None:
    """The reasons and causes spelled in the code are the ones created at 0 (so rate() sees the first one).
    (A path's own reasons, ``return "not_allowed", ...``, are image errors, not refusals.)"""
    sources = "".join(
        (REPO / p).read_text() for p in ("imgpipe/messages.py", "worker/transport.py", "worker/consumer.py")
    )
    spelled = set(re.findall(r'Refused\("(\w+)"', sources)) | set(re.findall(r'return "(\w+)"$', sources, re.M))
    assert spelled == set(metrics.REFUSAL_REASONS)
    runs = "".join((REPO / p).read_text() for p in ("worker/run.py", "worker/pipeline.py"))
    assert set(re.findall(r'RESENT\.labels\(cause="(\w+)"\)', runs)) == set(metrics.RESEND_CAUSES)


def test_exporter_drain_is_infinite_when_backlog_does_not_move(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    write_job(client, "stuck", total=40, done=5, failed=0, created=time.time() - 100)
    clock = Clock(time.time())
    collector = RedisCollector(client, "imgpipe", clock=clock)
    collector.sample()
    clock.now += 30
    snap = collector.sample()
    assert snap.rate == 0.0 and snap.backlog == 35 and snap.drain == math.inf


def test_exporter_reports_unreachable_redis() -> None:
    settings = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0")
    collector = RedisCollector.from_settings(settings)
    families = {f.name: f for f in collector.collect()}
    assert list(families) == [metrics.REDIS_UP]
    assert families[metrics.REDIS_UP].samples[0].value == 0


def test_queue_keys_are_where_celery_puts_messages(redis_url: str) -> None:
    """Messages sent through Celery (as the producer sends them), with and without a priority, are all counted."""
    from imgpipe import broker

    settings = RedisSettings(url=redis_url, queue="imgpipe-test")
    app = broker.make_celery("test-producer", settings)
    try:
        for priority in (None, 0, 5, 9):
            app.send_task(keys.TASK_CLASSIFY, args=[{"job": "j", "paths": []}], priority=priority)
    finally:
        app.close()
    client = redis.Redis.from_url(redis_url)
    snap = RedisCollector(client, settings.queue).sample()
    assert snap.queue_depth == 4
    assert sum(client.llen(k) for k in client.keys("imgpipe-test*")) == 4


def test_exporter_command(redis_url: str, tmp_path: Path) -> None:
    """`imgpipe exporter` as a user runs it: serves until SIGTERM, then exits 0."""
    client = redis.Redis.from_url(redis_url)
    client.rpush("imgpipe", "m1", "m2")
    proc = subprocess.Popen(
        imgpipe_argv("exporter", "--port", "0", "--bind", "127.0.0.1", "--interval", "0.2"),
        env=cli_env(IMGPIPE_REDIS_URL=redis_url),
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = wait_for_port(proc)
        samples = scrape(port)
        assert value(samples, metrics.QUEUE_DEPTH, queue="imgpipe") == 2
        assert value(samples, metrics.REDIS_UP) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_port(proc: subprocess.Popen[str], timeout: float = 60) -> int:
    """Read `serving http://HOST:PORT/metrics` from a process's stderr."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"serving http://[^:]+:(\d+)/metrics", line)
        if match:
            return int(match.group(1))
    raise AssertionError("no metrics port announced:\n" + "".join(lines))


# --- multiprocess mode, with real forked processes ------------------------------------------------------------

FORKING_SERVER = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys, time
    from imgpipe.settings import MetricsSettings
    from imgpipe.worker import metrics, metrics_server

    server = metrics_server.start_metrics_server(MetricsSettings(port=0, bind="127.0.0.1"))
    ctx = multiprocessing.get_context("fork")

    def child(ok, errors, hold, exit_cleanly):
        metrics.describe_worker("cpu", "digits", "0123456789abcdef0123")
        metrics.IMAGES.labels(status="ok").inc(ok)
        metrics.IMAGES.labels(status="error").inc(errors)
        metrics.ERRORS.labels(reason="decode").inc(errors)
        metrics.BATCH_SIZE.observe(ok + errors)
        metrics.IN_FLIGHT.inc(hold)
        if exit_cleanly:
            metrics_server.mark_this_process_dead()
            return
        time.sleep(600)

    plan = [(5, 1, 3, True), (7, 0, 4, False), (11, 2, 6, False)]
    children = [ctx.Process(target=child, args=args) for args in plan]
    for c in children:
        c.start()
    children[0].join()
    time.sleep(1.0)  # the sleeping children have written their values
    print(f"port={server.port} pids={children[1].pid},{children[2].pid}", flush=True)
    sys.stdin.readline()
    for c in children[1:]:
        c.kill()
    """
)


@pytest.fixture
def forking_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, list[int]]]:
    mp_dir = tmp_path / "multiproc"
    mp_dir.mkdir()
    (mp_dir / "counter_999999999.db").write_bytes(b"\0" * 16)  # a previous run's leftovers
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKING_SERVER],
        cwd=REPO,
        text=True,
        env=cli_env(PROMETHEUS_MULTIPROC_DIR=str(mp_dir)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(r"port=(\d+) pids=(\d+),(\d+)", line)
        assert match, f"forking server did not start: {line!r}"
        yield proc, int(match.group(1)), [int(match.group(2)), int(match.group(3))]
    finally:
        if proc.poll() is None:
            try:
                proc.communicate("\n", timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert not (mp_dir / "counter_999999999.db").exists(), "stale file of a dead process was not removed"


def test_multiprocess_sums_forked_children(forking_server: tuple[subprocess.Popen[str], int, list[int]]) -> None:
    _proc, port, (_sleeper, victim) = forking_server
    samples = scrape(port)
    assert value(samples, "imgpipe_images_total", status="ok") == 5 + 7 + 11
    assert value(samples, "imgpipe_images_total", status="error") == 1 + 0 + 2
    assert value(samples, "imgpipe_errors_total", reason="decode") == 3
    assert value(samples, "imgpipe_errors_total", reason="not_found") == 0  # created at 0 by the server
    assert value(samples, "imgpipe_stage_seconds_count", stage="infer") == 0
    assert value(samples, "imgpipe_batch_size_count") == 3
    assert value(samples, "imgpipe_batch_size_sum") == 6 + 7 + 13
    assert value(samples, "imgpipe_model_info", name="digits", sha="0123456789ab") == 1
    assert value(samples, "imgpipe_worker_info", version=metrics.__version__, device="cpu") == 1
    # The cleanly exited child said so; the other two still hold their images.
    assert value(samples, "imgpipe_in_flight_images") == 4 + 6

    os.kill(victim, signal.SIGKILL)  # no shutdown hook runs
    with contextlib.suppress(ProcessError):
        wait_until(lambda: value(scrape(port), "imgpipe_in_flight_images") == 4, 10, "dead child dropped", interval=0.1)
    samples = scrape(port)
    assert value(samples, "imgpipe_in_flight_images") == 4, "a SIGKILLed child's in-flight images stayed counted"
    # What the dead child counted stays counted.
    assert value(samples, "imgpipe_images_total", status="ok") == 23
    assert_bounded_labels(samples)


ALLOWED_LABELS: dict[str, set[str] | None] = {
    "status": set(metrics.STATUSES),
    "stage": set(metrics.STAGES),
    "reason": set(ImageError.REASONS) | set(metrics.REFUSAL_REASONS),  # errors_total, messages_refused_total
    "cause": set(metrics.RESEND_CAUSES),
    "queue": None,  # the default queue or a model queue: checked below
    "le": None,  # histogram bucket bounds, fixed by the code
    "gpu": None,  # GPU index: checked to be digits below
    "device": None,  # cpu | cuda:N: checked below
    "version": None,
    "name": None,  # model name from the model file's metadata
    "sha": None,  # 12 hex digits
}


def assert_bounded_labels(samples: Samples) -> None:
    """Every imgpipe label is one of a fixed few, and no value looks like a path, a job id or a pid."""
    for name, labels in imgpipe_samples(samples):
        for label, text in labels:
            assert label in ALLOWED_LABELS, f"{name} has unexpected label {label}={text!r}"
            allowed = ALLOWED_LABELS[label]
            if allowed is not None:
                assert text in allowed, f"{name}{{{label}={text!r}}} is outside {sorted(allowed)}"
            assert "/" not in text and "\\" not in text, f"{name}{{{label}={text!r}}} looks like a path"
            if label == "gpu":
                assert text.isdigit()
            if label == "device":
                assert re.fullmatch(r"cpu|cuda:\d+", text), text
            if label == "sha":
                assert re.fullmatch(r"[0-9a-f]{12}", text), text
            if label == "queue":
                assert re.fullmatch(r"imgpipe(:model:[0-9a-f]{12})?", text), text


def test_multiproc_dir_set_after_import_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # This test process imported prometheus_client without the variable: setting it now cannot work.
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="set after prometheus_client was imported"):
        metrics_server.multiprocess_dir()


def test_stale_metric_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"counter_{dead.pid}.db", f"gauge_livesum_{dead.pid}.db", f"counter_{os.getpid()}.db"):
        (tmp_path / name).write_bytes(b"")
    assert metrics_server.remove_stale_files(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"counter_{os.getpid()}.db"]


def test_metrics_port_in_use_is_a_config_error() -> None:
    first = metrics_server.start_metrics_server(MetricsSettings(port=0, bind="127.0.0.1"), worker=False)
    assert first is not None
    try:
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            metrics_server.start_metrics_server(MetricsSettings(port=first.port, bind="127.0.0.1"), worker=False)
    finally:
        first.close()
    assert metrics_server.start_metrics_server(MetricsSettings(port=None)) is None


def test_single_process_worker_metrics_include_process_metrics() -> None:
    server = metrics_server.start_metrics_server(MetricsSettings(port=0, bind="127.0.0.1"))
    assert server is not None and not server.multiprocess
    try:
        samples = scrape(server.port)
    finally:
        server.close()
    assert ("imgpipe_images_total", frozenset({("status", "ok")})) in samples
    assert any(name.startswith("process_") for name, _ in samples)
    assert_bounded_labels(samples)


# --- GPU gauges: there is no GPU here, so NVML is a fake object; the test says so in its name ------------------


def test_gpu_gauges_with_fake_nvml_no_gpu_here() -> None:
    gib = 1024**3
    fake_nvml = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=(h + 1) * gib, total=80 * gib),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=57 if h == 0 else 3),
    )
    families = {f.name: f for f in metrics_server.NvmlCollector(fake_nvml).collect()}
    used = {s.labels["gpu"]: s.value for s in families[metrics.GPU_MEMORY_USED].samples}
    util = {s.labels["gpu"]: s.value for s in families[metrics.GPU_UTILIZATION].samples}
    assert used == {"0": 1 * gib, "1": 2 * gib}
    assert util == {"0": 0.57, "1": 0.03}
    assert {s.value for s in families[metrics.GPU_MEMORY_TOTAL].samples} == {80 * gib}


def test_read_jobs_skips_expired_hashes(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    write_job(client, "kept", total=3, done=1, failed=1, created=time.time())
    client.zadd(keys.JOBS, {"expired": time.time()})
    jobs = read_jobs(client)
    assert [(j.job_id, j.backlog, j.active) for j in jobs] == [("kept", 1, True)]


OBSERVE_MANY_SCRIPT = """
import json, os, sys
from prometheus_client import CollectorRegistry, Histogram
from imgpipe.worker import metrics

registry = CollectorRegistry()
buckets = (0.001, 0.01, 0.1, 1.0)
one = Histogram("one_by_one", "h", ["stage"], buckets=buckets, registry=registry).labels(stage="decode")
many = Histogram("together", "h", ["stage"], buckets=buckets, registry=registry).labels(stage="decode")
amounts = [0.0, 0.0005, 0.001, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.99, 1.0, 1.5, 300.0]
for amount in amounts:
    one.observe(amount)
metrics.observe_many(many, amounts)
metrics.observe_many(many, [])
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    from prometheus_client import multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
out = {}
for family in registry.collect():
    for sample in family.samples:
        if not sample.name.endswith("_created"):
            out[sample.name + json.dumps(sorted(sample.labels.items()))] = sample.value
json.dump(out, sys.stdout)
"""


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one-process", "multiprocess"])
def test_observe_many_counts_as_observing_one_by_one(multiprocess: bool, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    if multiprocess:
        env[metrics.MULTIPROC_ENV] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", OBSERVE_MANY_SCRIPT], env=env, capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    samples = json.loads(out)
    one = {k.replace("one_by_one", "h"): v for k, v in samples.items() if k.startswith("one_by_one")}
    many = {k.replace("together", "h"): v for k, v in samples.items() if k.startswith("together")}
    assert one and one == many
    assert many['h_bucket[["le", "0.001"], ["stage", "decode"]]'] == 4  # 0.001 itself is in the 0.001 bucket
    assert many['h_count[["stage", "decode"]]'] == 12
