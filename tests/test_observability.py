"""End to end: a real Prometheus scrapes real `imgpipe worker` processes and `imgpipe exporter` while
`imgpipe enqueue --wait` runs a job; counts, recording rules, alert rules and every dashboard query are
checked through the Prometheus HTTP API."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from imgpipe.procs import ProcessError, imgpipe_argv
from imgpipe.procs import wait_until as poll_until
from tests.conftest import REPO, cli_env, free_port
from tests.images import write_bad, write_good
from tests.test_deploy import ALERTS, DASHBOARD, dashboard_targets, grafana_expr
from tests.test_metrics import assert_bounded_labels, scrape, value, wait_for_port

DEPLOY = REPO / "deploy"
GOOD_IMAGES = 50


@dataclass
class Stack:
    prometheus: str  # base URL
    worker_port: int
    exporter_port: int
    images: int  # images the job enqueued
    failed: int
    data: Path
    started: float
    enqueue: subprocess.CompletedProcess[str]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; fails the test unless Prometheus answers with success."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr!r}: HTTP {exc.code}: {exc.read().decode()[:500]}") from None
        assert body["status"] == "success", f"{expr!r}: {body}"
        return list(body["data"]["result"])

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, expected: float | None = None, timeout: float = 30) -> float | None:
        """The value of ``expr`` once it equals ``expected`` (or, without one, is above 0), or at the timeout.

        Recording rules and scrapes run every second, so a value can trail the job by a second or two.
        """

        def done() -> bool:
            got = self.scalar(expr)
            return got == expected if expected is not None else (got is not None and got > 0)

        with contextlib.suppress(ProcessError):
            poll_until(done, timeout, expr, interval=0.25)
        return self.scalar(expr)


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    with open(log, "w") as fh:
        return subprocess.Popen(
            args, cwd=REPO, env=env or cli_env(), stdout=fh, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL of the process group: the worker's children go too."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_until(check: Any, what: str, timeout: float, children: list[subprocess.Popen[Any]], logs: list[Path]) -> None:
    """imgpipe.procs.wait_until, failing at once (with the logs) when one of ``children`` exits."""

    def alive() -> None:
        dead = [p.args for p in children if p.poll() is not None]
        if dead:
            raise ProcessError(f"exited: {dead}")

    try:
        poll_until(check, timeout, what, interval=0.2, check=alive)
    except ProcessError as exc:
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
        raise AssertionError(f"{what}: {exc}\n{tails}") from None


def prometheus_config(worker_port: int, exporter_port: int) -> str:
    """The shipped rules, scraped every second from the local worker and exporter (job names as deployed)."""
    rules = sorted(str(p) for p in (DEPLOY / "prometheus" / "rules").glob("*.yml"))
    return json.dumps(
        {  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rules,
            "scrape_configs": [
                {"job_name": "imgpipe-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
                {"job_name": "imgpipe-exporter", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]},
            ],
        },
        indent=2,
    )


@pytest.fixture(scope="module")
def stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is missing: apt-get install -y prometheus (.ci/run installs it)")
    tmp = tmp_path_factory.mktemp("observability")
    data = tmp / "data"
    write_good(data / "a", GOOD_IMAGES // 2)
    write_good(data / "b" / "c", GOOD_IMAGES - GOOD_IMAGES // 2, start=GOOD_IMAGES // 2)
    bad = write_bad(data / "bad")
    failed = sum(1 for p in bad.values() if p.is_file())  # folders and missing files are not enqueued
    redis_url = redis_server + "/3"
    redis.Redis.from_url(redis_url).flushdb()
    env = cli_env(IMGPIPE_REDIS_URL=redis_url, IMGPIPE_ALLOWED_ROOTS=str(data), IMGPIPE_MAX_WAIT_MS="20")

    worker_port, prom_port = free_port(), free_port()
    procs: list[subprocess.Popen[Any]] = []
    logs = [tmp / "worker.log", tmp / "exporter.log", tmp / "prometheus.log"]
    try:
        # Two worker processes: the supervisor serves their summed metrics (multiprocess mode).
        procs.append(
            start(imgpipe_argv("worker", "--concurrency", "2", "--metrics-port", str(worker_port)), logs[0], env)
        )
        exporter = subprocess.Popen(
            imgpipe_argv("exporter", "--port", "0", "--bind", "127.0.0.1", "--interval", "1", "--window", "30"),
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append(exporter)
        exporter_port = wait_for_port(exporter)
        config = tmp / "prometheus.yml"
        config.write_text(prometheus_config(worker_port, exporter_port))
        procs.append(
            start(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                logs[2],
            )
        )
        base = f"http://127.0.0.1:{prom_port}"
        wait_until(lambda: http_ok(f"{base}/-/ready"), "prometheus ready", 60, procs, logs)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{worker_port}/metrics"), "worker /metrics", 60, procs, logs)

        def targets_up() -> bool:
            with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=5) as response:
                active = json.load(response)["data"]["activeTargets"]
            return len(active) == 2 and all(t["health"] == "up" for t in active)

        wait_until(targets_up, "both targets scraped", 30, procs, logs)
        # Something that is not an imgpipe message, written to the queue: the worker refuses it (reason junk).
        redis.Redis.from_url(redis_url).lpush("imgpipe", "hello")
        started = time.time()
        enqueue = subprocess.run(
            imgpipe_argv("enqueue", str(data), "--wait"), cwd=REPO, env=env, capture_output=True, text=True, timeout=180
        )
        match = re.search(r"enqueued (\d+) images", enqueue.stderr)
        assert match, enqueue.stderr
        yield Stack(base, worker_port, exporter_port, int(match.group(1)), failed, data, started, enqueue)
        if os.environ.get("IMGPIPE_DASHBOARD_PNG"):  # docs/dashboard.png; see docs/monitoring.md
            demo_load(env, data)
            render_dashboard(base, started - 5, time.time(), Path(os.environ["IMGPIPE_DASHBOARD_PNG"]))
    finally:
        for proc in reversed(procs):
            stop(proc)
        redis.Redis.from_url(redis_url).flushdb()


def test_prometheus_counts_every_image_of_the_job(stack: Stack) -> None:
    assert stack.images == GOOD_IMAGES + stack.failed
    assert stack.enqueue.returncode == 1, stack.enqueue.stderr  # some images failed: exit 1, as documented
    # Prometheus has scraped the workers after the job finished: the counts equal the job's images.
    assert stack.wait_for("sum(imgpipe_images_total)", stack.images) == stack.images
    assert stack.scalar('sum(imgpipe_images_total{status="error"})') == stack.failed
    assert stack.scalar("sum(imgpipe_errors_total)") == stack.failed
    # The throughput recording rule (shipped deploy/prometheus/rules) has a value, and it saw the images.
    throughput = stack.wait_for("imgpipe:images:rate1m")
    assert throughput is not None and throughput > 0
    per_worker = stack.query("instance:imgpipe_images:rate1m")
    assert [r["metric"]["instance"] for r in per_worker] == [f"127.0.0.1:{stack.worker_port}"]
    assert stack.scalar("imgpipe:batch_size:mean5m") is not None
    assert stack.scalar('count(imgpipe_stage_seconds_count{stage=~"decode|infer|write"} > 0)') == 3
    ratio = stack.scalar("imgpipe:error_ratio:rate5m")
    assert ratio is not None and 0 < ratio < 1


def test_exporter_sees_the_job_drain(stack: Stack) -> None:
    assert stack.wait_for("max(imgpipe_backlog_images)", 0) == 0
    assert stack.wait_for("max(imgpipe_jobs_active)", 0) == 0
    assert stack.scalar("max(imgpipe_queue_depth)") == 0
    # Per queue: the default one, served by the one worker host of this machine, drained.
    assert stack.scalar('max(imgpipe_queue_worker_hosts{queue="imgpipe"})') == 1
    assert stack.wait_for('max(imgpipe_queue_backlog_images{queue="imgpipe"})', 0) == 0
    assert stack.wait_for('max(imgpipe_queue_drain_seconds{queue="imgpipe"})', 0) == 0
    assert stack.scalar("max(imgpipe_redis_up)") == 1
    assert stack.wait_for("imgpipe:drain_seconds:capped", 0) == 0
    # The exporter's recent rate saw the job go by.
    peak = stack.wait_for("max_over_time(imgpipe_recent_rate_images_per_second[5m])")
    assert peak is not None and peak > 0


def test_a_refused_message_is_counted_and_the_alert_goes_pending(stack: Stack) -> None:
    assert stack.wait_for('sum(imgpipe_messages_refused_total{reason="junk"})', 1) == 1
    assert stack.scalar('sum(imgpipe_messages_refused_total{reason="schema"})') == 0  # created at 0
    assert stack.scalar("sum(imgpipe_duplicate_messages_total)") == 0
    pending = 'count(ALERTS{alertname="ImgpipeMessagesRefused", alertstate="pending", reason="junk"})'
    assert stack.wait_for(pending, 1) == 1  # rules run every second: it may trail the scrape by one
    assert stack.scalar('count(ALERTS{alertname="ImgpipeMessagesRefused"})') == 1


def test_every_dashboard_query_evaluates(stack: Stack) -> None:
    targets = dashboard_targets()
    assert len(targets) >= 20
    # Rates over recording rules need two evaluations after the job's counts reached Prometheus; on a loaded
    # host (the full suite on 2 cores) that can trail the job by seconds: each empty query is asked again
    # for up to 30 s before it counts as empty.
    # Only what this host cannot produce may be empty: the GPU series.
    allowed_empty = re.compile(r"gpu")
    expected = [(title, expr) for title, expr in targets if not allowed_empty.search(expr)]
    unexpected = [(title, expr) for title, expr in expected if not stack.query(grafana_expr(expr))]
    deadline = time.monotonic() + 30
    while unexpected and time.monotonic() < deadline:
        time.sleep(0.5)
        unexpected = [(title, expr) for title, expr in unexpected if not stack.query(grafana_expr(expr))]
    assert not unexpected, f"dashboard queries with no data after a job: {unexpected}"


def test_alert_rules_evaluate_and_stay_quiet(stack: Stack) -> None:
    # After the job: the error ratio (4 of 54) is above 5% so that alert may be pending, and the junk message
    # refused keeps ImgpipeMessagesRefused pending (for 15 minutes); nothing else may be.
    # (While the workers were still loading the model, the backlog did not move: those alerts went pending and
    # must have gone back to inactive now.)
    quiet_allowed = {"ImgpipeErrorRatioHigh", "ImgpipeMessagesRefused"}
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{stack.prometheus}/api/v1/rules", timeout=10) as response:
            groups = json.load(response)["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        active = {r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"}
        if active <= quiet_allowed or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {r["name"] for r in rules if r["type"] == "alerting"} == ALERTS
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    assert active <= quiet_allowed, active


def test_live_worker_labels_are_bounded(stack: Stack) -> None:
    samples = scrape(stack.worker_port)
    assert value(samples, "imgpipe_images_total", status="ok") == GOOD_IMAGES
    assert_bounded_labels(samples)
    text = json.dumps(sorted(str(k) for k in samples))
    assert str(stack.data) not in text
    series = stack.query('{__name__=~"imgpipe_.*"}')
    for s in series:
        for label, text in s["metric"].items():
            assert str(stack.data) not in text and "/" not in text, f"{label}={text!r} in {s['metric']}"


# --- an honest picture of the dashboard: its own queries, answered by the Prometheus of this test ------------------

RENDER_RATE_INTERVAL = "5s"  # Grafana's $__rate_interval for a 1 s scrape interval, rounded up


def demo_load(env: dict[str, str], folder: Path) -> None:
    """More traffic before drawing (only with IMGPIPE_DASHBOARD_PNG): three jobs a few seconds apart."""
    jobs = []
    for i in range(3):
        write_good(folder / f"load{i}", 1500, start=10_000 * (i + 1))
        write_bad(folder / f"load{i}" / "bad")
        jobs.append(
            subprocess.Popen(
                imgpipe_argv("enqueue", str(folder / f"load{i}"), "--wait"),
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        time.sleep(6)
    for job in jobs:
        job.wait(timeout=300)
    time.sleep(15)  # let rates fall back to zero on the graphs


def render_dashboard(base: str, start: float, end: float, out: Path) -> None:
    """Draw every time-series and heatmap panel of the dashboard from Prometheus range queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] in ("timeseries", "heatmap")]
    columns = 4
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), constrained_layout=True)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RENDER_RATE_INTERVAL)
            url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(
                {"query": grafana_expr(expr), "start": start, "end": end, "step": "1"}
            )
            with urllib.request.urlopen(url, timeout=30) as response:
                result = json.load(response)["data"]["result"]
            for series in result:
                label = target.get("legendFormat", "")
                for key, text in series["metric"].items():
                    label = label.replace("{{" + key + "}}", text)
                if panel["type"] == "heatmap":
                    label = "le=" + series["metric"].get("le", "")
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 5 else None)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel("seconds", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_ylabel(panel["fieldConfig"]["defaults"].get("unit", ""), fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
        else:
            ax.text(0.5, 0.5, "no data on this host", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(
        "imgpipe dashboard panels: the dashboard's own queries, answered by a real Prometheus that "
        "scraped `imgpipe worker` and `imgpipe exporter` in tests/test_observability.py "
        "(drawn with matplotlib, not a Grafana screenshot)",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
