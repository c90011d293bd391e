"""Every command as a user meets it: one error style, honest status, cancel and delete, failure reasons,
empty folders, where reports go, help that names every setting, and the README table from the settings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from imgpipe import keys
from imgpipe.broker import safe_url
from imgpipe.jobs import is_cancelled
from imgpipe.registry import WorkerInfo, write_heartbeat
from imgpipe.settings import VARS, markdown_table
from tests.conftest import REPO, cli_env, run_cli
from tests.workers import Workers, wait_for_job

ERROR = re.compile(r"^imgpipe: error: \S.*$")


def one_error_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The run ended as a user mistake: exit 2, exactly one line `imgpipe: error: ...`, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and ERROR.match(lines[-1]), result.stderr
    for text in expected:
        assert text in lines[-1], lines[-1]
    return lines[-1]


def redis_env(redis_url: str, **extra: str) -> dict[str, str]:
    return cli_env(IMGPIPE_REDIS_URL=redis_url, **extra)


def images(folder: Path, source: Path, count: int) -> Path:
    """``count`` demo PNGs copied into ``folder`` (a fresh tree the test owns)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*.png"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def enqueue(redis_url: str, *args: str) -> str:
    result = run_cli("enqueue", *args, env=redis_env(redis_url), timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# --- one error style ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nope"], "No such command 'nope'"),
        (["classify"], "Missing argument 'PATHS...'"),
        (["enqueue", "--chunk-size", "0", "x"], "'--chunk-size'"),
        (["results", "J", "--format", "xml"], "'--format'"),
        (["classify", "x.png", "--no-such-flag"], "No such option '--no-such-flag'"),
        (["evaluate", "/nonexistent/m.pt", "."], "'MODEL'"),
        (["status", "--limit", "many"], "'--limit'"),
        (["cancel"], "Missing argument 'JOB'"),
        (["delete", "a", "b"], "unexpected extra argument"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else None,
)
def test_click_usage_errors_are_one_imgpipe_line_exit_2(args: list[str], expected: str) -> None:
    line = one_error_line(run_cli(*args, timeout=60), expected)
    assert "--help" in line  # says where to look


def test_a_bad_setting_of_the_worker_is_one_line(tmp_path: Path) -> None:
    one_error_line(
        run_cli("worker", env=cli_env(IMGPIPE_MAX_BATCH="abc"), timeout=60), "IMGPIPE_MAX_BATCH='abc' is not an integer"
    )


def test_a_worker_whose_processes_would_share_a_gpu_says_so_first(demo_data: Path) -> None:
    # Two processes on one GPU ran a fifth of one's rate (README, On a GPU): the warning comes before anything
    # starts. No GPU here: each child then stops at Redis (nothing listens on port 1), and so does the worker.
    env = cli_env(IMGPIPE_REDIS_URL="redis://127.0.0.1:1/0", IMGPIPE_METRICS_PORT="0", IMGPIPE_METRICS_BIND="127.0.0.1")
    result = run_cli(
        "worker", "--device", "cuda:0", "--concurrency", "2", "--allowed-roots", str(demo_data), env=env, timeout=120
    )
    assert result.returncode == 2, result.stderr
    warning = [line for line in result.stderr.splitlines() if "WARNING" in line and "share cuda:0" in line]
    assert len(warning) == 1 and "2 worker processes will share cuda:0" in warning[0], result.stderr
    assert "Traceback" not in result.stderr
    alone = run_cli("worker", "--device", "cuda:0", "--allowed-roots", str(demo_data), env=env, timeout=120)
    assert alone.returncode == 2 and "share" not in alone.stderr, alone.stderr


def test_classify_to_a_missing_folder_is_one_line(demo_data: Path, tmp_path: Path) -> None:
    image = next((demo_data / "val" / "4").glob("*.png"))
    one_error_line(
        run_cli("classify", str(image), "-o", "/missing/dir/x.csv", timeout=120),
        "cannot write /missing/dir/x.csv: no such folder",
    )
    one_error_line(run_cli("classify", str(image), "-o", str(tmp_path), timeout=120), "is a directory")


def test_results_to_a_missing_folder_is_one_line_and_writes_nothing(
    redis_url: str, demo_data: Path, tmp_path: Path
) -> None:
    job_id = enqueue(redis_url, str(images(tmp_path / "in", demo_data / "val", 3)))
    result = run_cli("results", job_id, "-o", "/missing/dir/labels.csv", env=redis_env(redis_url), timeout=60)
    one_error_line(result, "cannot write /missing/dir/labels.csv")
    out = tmp_path / "labels.csv"
    result = run_cli("results", job_id, "-o", str(out), env=redis_env(redis_url), timeout=60)
    assert result.returncode == 0 and out.read_text().startswith("path,status")
    assert not (tmp_path / "labels.csv.partial").exists()


# --- empty folders ------------------------------------------------------------------------------------------


def test_an_empty_folder_is_refused_by_classify_and_enqueue_and_creates_no_job(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    one_error_line(run_cli("classify", str(empty), timeout=120), f"no image files under {empty}")
    one_error_line(run_cli("enqueue", str(empty), env=redis_env(redis_url), timeout=60), "no image files under")
    assert client.zcard(keys.JOBS) == 0 and not client.keys(f"{keys.PREFIX}:job:*")


# --- status -------------------------------------------------------------------------------------------------


def test_status_says_no_live_worker_instead_of_an_eta(redis_url: str, demo_data: Path, tmp_path: Path) -> None:
    job_id = enqueue(redis_url, str(images(tmp_path / "in", demo_data / "val", 5)))
    one = run_cli("status", job_id, env=redis_env(redis_url), timeout=60)
    assert one.returncode == 0, one.stderr
    assert re.search(r"^state\s+queued$", one.stdout, re.M)
    assert re.search(r"^eta\s+-$", one.stdout, re.M)
    assert "no live worker on queue 'imgpipe'" in one.stdout
    table = run_cli("status", env=redis_env(redis_url), timeout=60)
    assert "no live worker on queue 'imgpipe'" in table.stdout


def test_status_says_when_no_worker_has_taken_a_message(
    redis_url: str, client: redis.Redis, demo_data: Path, tmp_path: Path
) -> None:
    # A worker that is alive (its heartbeat is fresh) but has finished nothing for two minutes: the registry
    # record a stuck worker publishes, written with the registry's own function.
    job_id = enqueue(redis_url, str(images(tmp_path / "in", demo_data / "val", 5)))
    now = time.time()
    client.hset(keys.job(job_id), "created", f"{now - 120:.6f}")
    stuck = WorkerInfo("imgpipe-1@stuck", "stuck", 1, "m@0", "cpu", ("imgpipe",), now - 300, now, now - 120)
    write_heartbeat(client, stuck)
    result = run_cli("status", job_id, env=redis_env(redis_url), timeout=60)
    assert re.search(r"no worker has taken a message for 1[12]\d s \(1 live on 'imgpipe'\)", result.stdout), (
        result.stdout
    )
    assert re.search(r"^eta\s+-$", result.stdout, re.M)


def test_status_of_a_quick_job_shows_how_long_it_took_not_a_made_up_rate(
    tmp_path: Path, redis_url: str, client: redis.Redis, demo_data: Path
) -> None:
    folder = images(tmp_path / "in", demo_data / "val", 12)
    with Workers(tmp_path, redis_env(redis_url, IMGPIPE_ALLOWED_ROOTS=str(folder))) as workers:
        workers.start()
        job_id = enqueue(redis_url, str(folder))
        wait_for_job(client, job_id, 120, workers)
    result = run_cli("status", job_id, "--json", env=redis_env(redis_url), timeout=60)
    status = json.loads(result.stdout)
    assert status["state"] == "done" and status["done"] == 12
    # The twelve records were written within a second: no rate is better than 12 / 0.0001 s.
    started, updated = (float(client.hget(keys.job(job_id), f) or 0) for f in ("started", "updated"))
    if updated - started < 1.0:
        assert status["rate"] is None
    else:
        assert status["rate"] <= 12 / (updated - started) + 1e-6
    assert status["took"] is not None and status["took"] >= 0
    text = run_cli("status", job_id, env=redis_env(redis_url), timeout=60).stdout
    assert re.search(r"^took\s+\d+\.\d s$", text, re.M), text


def test_status_watch_prints_lines_when_stdout_is_not_a_terminal(
    tmp_path: Path, redis_url: str, client: redis.Redis, demo_data: Path
) -> None:
    folder = images(tmp_path / "in", demo_data / "train", 40)
    job_id = enqueue(redis_url, str(folder))
    env = redis_env(redis_url)
    watcher = subprocess.Popen(
        [*run_cli_argv("status", job_id, "--watch", "--every", "0.2")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        with Workers(tmp_path, redis_env(redis_url, IMGPIPE_ALLOWED_ROOTS=str(folder))) as workers:
            workers.start()
            wait_for_job(client, job_id, 120, workers)
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, err
    lines = [line for line in out.splitlines() if f"job {job_id}" in line]
    assert len(lines) >= 2, out  # at least one while waiting, one when done
    assert re.search(rf"job {job_id} queued: 0 ok, 0 failed of 40, rate -; no live worker", lines[0]), lines[0]
    assert re.search(rf"job {job_id} done: 40 ok, 0 failed of 40 in \d+\.\d s$", lines[-1]), lines[-1]
    assert "\r" not in out and "\x1b" not in out  # no progress-bar drawing in a log


def run_cli_argv(*args: str) -> list[str]:
    from imgpipe.procs import imgpipe_argv

    return imgpipe_argv(*args)


# --- enqueue --wait says why images failed ---------------------------------------------------------------------


def test_enqueue_wait_prints_failure_reasons_with_counts(
    tmp_path: Path, redis_url: str, client: redis.Redis, demo_data: Path
) -> None:
    allowed = images(tmp_path / "allowed", demo_data / "val", 3)
    outside = images(tmp_path / "outside", demo_data / "train", 2)
    with Workers(tmp_path, redis_env(redis_url, IMGPIPE_ALLOWED_ROOTS=str(allowed))) as workers:
        workers.start()
        result = run_cli("enqueue", str(allowed), str(outside), "--wait", env=redis_env(redis_url), timeout=120)
    assert result.returncode == 1, result.stderr
    assert "done: 3 ok, 2 failed of 5" in result.stderr
    assert "imgpipe: 2 not_allowed: path is outside the allowed roots (IMGPIPE_ALLOWED_ROOTS)" in result.stderr
    status = run_cli("status", result.stdout.strip(), env=redis_env(redis_url), timeout=60)
    assert "  2 not_allowed: path is outside" in status.stdout


# --- cancel and delete --------------------------------------------------------------------------------------


def test_is_cancelled_reads_the_job_hash_field() -> None:
    assert not is_cancelled(None)
    assert not is_cancelled(b"")
    assert is_cancelled(b"1764213000.123456")
    assert is_cancelled("1764213000.5")
    assert not is_cancelled(b"not a time")


def test_cancel_asks_first_and_marks_the_job_cancelled(
    redis_url: str, client: redis.Redis, demo_data: Path, tmp_path: Path
) -> None:
    job_id = enqueue(redis_url, str(images(tmp_path / "in", demo_data / "val", 6)))
    env = redis_env(redis_url)
    # No answer (a script without --yes): after the question, one error line; nothing changed.
    closed = run_cli("cancel", job_id, env=env, input="", timeout=60)
    assert closed.returncode == 2 and "Traceback" not in closed.stderr
    question, error = closed.stderr.strip().splitlines()
    assert question.startswith(f"Cancel job {job_id} (0 ok, 0 failed of 6, 6 images not done)? [y/N]")
    assert ERROR.match(error) and "pass --yes" in error
    declined = run_cli("cancel", job_id, env=env, input="n\n", timeout=60)
    assert declined.returncode == 1 and "nothing changed" in declined.stderr
    assert not is_cancelled(client.hget(keys.job(job_id), "cancelled"))
    assert client.exists(keys.job_pending(job_id))

    agreed = run_cli("cancel", job_id, env=env, input="y\n", timeout=60)
    assert agreed.returncode == 0, agreed.stderr
    assert f"job {job_id} cancelled (0 ok, 0 failed of 6)" in agreed.stderr
    assert is_cancelled(client.hget(keys.job(job_id), "cancelled"))
    assert not client.exists(keys.job_pending(job_id))  # the lost-message sweeper will not resend it
    assert job_id.encode() not in client.smembers(keys.PENDING_JOBS)
    status = json.loads(run_cli("status", job_id, "--json", env=env, timeout=60).stdout)
    assert status["state"] == "cancelled" and status["cancelled"] is not None and status["eta"] is None
    assert re.search(rf"^{re.escape(job_id)}\s+cancelled\s", run_cli("status", env=env, timeout=60).stdout, re.M)
    again = run_cli("cancel", job_id, "--yes", env=env, timeout=60)
    assert again.returncode == 0 and "already cancelled" in again.stderr
    one_error_line(run_cli("cancel", "no-such-job", "--yes", env=env, timeout=60), "no such job: 'no-such-job'")


def test_enqueue_wait_ends_with_exit_1_when_its_job_is_cancelled(
    redis_url: str, demo_data: Path, tmp_path: Path
) -> None:
    env = redis_env(redis_url)
    waiting = subprocess.Popen(
        run_cli_argv("enqueue", str(images(tmp_path / "in", demo_data / "val", 4)), "--wait", "--job", "w1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert waiting.stdout is not None and waiting.stdout.readline().strip() == "w1"
        assert run_cli("cancel", "w1", "-y", env=env, timeout=60).returncode == 0
        _, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 1 and "job w1 cancelled: 0 ok, 0 failed of 4" in err, err


def test_workers_skip_and_acknowledge_the_messages_of_a_cancelled_job(
    tmp_path: Path, redis_url: str, client: redis.Redis, demo_data: Path
) -> None:
    from imgpipe import defaults
    from imgpipe.procs import wait_until

    folder = images(tmp_path / "in", demo_data / "val", 8)
    result = run_cli("enqueue", str(folder), "--chunk-size", "2", env=redis_env(redis_url), timeout=60)
    job_id = result.stdout.strip()
    assert client.llen(defaults.QUEUE) == 4
    assert run_cli("cancel", job_id, "--yes", env=redis_env(redis_url), timeout=60).returncode == 0
    with Workers(tmp_path, redis_env(redis_url, IMGPIPE_ALLOWED_ROOTS=str(folder))) as workers:
        workers.start()
        wait_until(
            lambda: client.llen(defaults.QUEUE) == 0 and client.hlen("unacked") == 0,
            60,
            "the cancelled job's messages taken and acknowledged",
        )
    assert client.hlen(keys.job_results(job_id)) == 0, "a worker classified images of a cancelled job"
    status = json.loads(run_cli("status", job_id, "--json", env=redis_env(redis_url), timeout=60).stdout)
    assert (status["state"], status["done"], status["failed"]) == ("cancelled", 0, 0)


def test_delete_removes_every_key_of_the_job(
    tmp_path: Path, redis_url: str, client: redis.Redis, demo_data: Path
) -> None:
    folder = images(tmp_path / "in", demo_data / "val", 5)
    with Workers(tmp_path, redis_env(redis_url, IMGPIPE_ALLOWED_ROOTS=str(folder))) as workers:
        workers.start()
        kept = enqueue(redis_url, str(folder))
        job_id = enqueue(redis_url, str(folder))
        wait_for_job(client, job_id, 120, workers)
        wait_for_job(client, kept, 120, workers)
    client.lpush(keys.DEAD_LETTER, json.dumps({"job": job_id, "message_id": "m", "paths": [], "reason": "x"}))
    client.lpush(keys.DEAD_LETTER, json.dumps({"job": kept, "message_id": "k", "paths": [], "reason": "x"}))
    assert client.hlen(keys.job_results(job_id)) == 5
    env = redis_env(redis_url)
    declined = run_cli("delete", job_id, env=env, input="n\n", timeout=60)
    assert declined.returncode == 1 and client.exists(keys.job(job_id))
    result = run_cli("delete", job_id, "--yes", env=env, timeout=60)
    assert result.returncode == 0 and f"job {job_id} deleted (5 records)" in result.stderr, result.stderr
    assert not [k for k in client.keys("*") if job_id.encode() in k]
    assert job_id.encode() not in client.zrange(keys.JOBS, 0, -1)
    assert [json.loads(e)["job"] for e in client.lrange(keys.DEAD_LETTER, 0, -1)] == [kept]
    assert client.hlen(keys.job_results(kept)) == 5  # the other job is untouched
    one_error_line(run_cli("status", job_id, env=env, timeout=60), f"no such job: {job_id!r}")


# --- evaluate: where the report goes ------------------------------------------------------------------------------


def test_evaluate_writes_its_report_next_to_the_model_and_says_where(
    default_model: Path, demo_data: Path, tmp_path: Path
) -> None:
    model = tmp_path / "models" / "digits.pt"
    model.parent.mkdir()
    shutil.copy(default_model, model)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = subprocess.run(
        run_cli_argv("evaluate", str(model), str(demo_data)),
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=elsewhere,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for suffix in (".report.json", ".confusion.png"):
        path = model.parent / f"digits.eval{suffix}"
        assert path.is_file() and f"report: {path}" in result.stderr
    assert not list(elsewhere.iterdir())  # nothing in the current folder
    reports = tmp_path / "reports"
    reports.mkdir()
    result = run_cli("evaluate", str(model), str(demo_data / "val"), "-o", str(reports), timeout=300)
    assert result.returncode == 0 and (reports / "digits.eval.report.json").is_file(), result.stderr
    one_error_line(
        run_cli("evaluate", str(model), str(demo_data), "-o", "/missing/dir/r", timeout=120),
        "cannot write the report to /missing/dir/r.*: no such folder",
    )


# --- help ---------------------------------------------------------------------------------------------------------


def test_main_help_says_what_a_worker_needs() -> None:
    result = run_cli("--help", timeout=60)
    assert "IMGPIPE_ALLOWED_ROOTS=DIR imgpipe worker" in result.stdout
    assert "imgpipe train DATA" in result.stdout and "cancel" in result.stdout and "delete" in result.stdout


# Commands, the settings sections each uses, and the variables of those it has no use for (in-process
# batches never wait to fill; evaluate's model is its MODEL argument; job commands only talk to Redis).
SECTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "classify": (("model", "batch", "security"), ("IMGPIPE_MAX_WAIT_MS",)),
    "evaluate": (("model", "batch", "security"), ("IMGPIPE_MAX_WAIT_MS", "IMGPIPE_MODEL")),
    "enqueue": (("redis", "producer"), ("IMGPIPE_WATCH_SETTLE_MS", "IMGPIPE_WATCH_RESCAN_S")),
    "status": (("redis",), ("IMGPIPE_VISIBILITY_TIMEOUT", "IMGPIPE_RESULT_TTL_DAYS")),
    "results": (("redis",), ("IMGPIPE_QUEUE", "IMGPIPE_VISIBILITY_TIMEOUT", "IMGPIPE_RESULT_TTL_DAYS")),
    "cancel": (("redis",), ("IMGPIPE_QUEUE", "IMGPIPE_VISIBILITY_TIMEOUT", "IMGPIPE_RESULT_TTL_DAYS")),
    "delete": (("redis",), ("IMGPIPE_QUEUE", "IMGPIPE_VISIBILITY_TIMEOUT", "IMGPIPE_RESULT_TTL_DAYS")),
    "worker": (("redis", "model", "batch", "security", "metrics", "worker"), ()),
}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_help_names_every_setting_the_command_reads(name: str) -> None:
    text = " ".join(run_cli(name, "--help", timeout=60).stdout.split())
    sections, unused = SECTIONS[name]
    missing = [v.env for v in VARS if v.section in sections and v.env not in text and v.env not in unused]
    assert not missing, f"`imgpipe {name} --help` does not mention {missing}"


@pytest.mark.parametrize(
    "name",
    [
        "classify",
        "evaluate",
        "demo-data",
        "enqueue",
        "status",
        "results",
        "cancel",
        "delete",
        "train",
    ],
)
def test_every_option_is_described(name: str) -> None:
    import click

    from imgpipe.cli import cli

    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    bare = [p.name for p in command.params if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert not bare, f"`imgpipe {name}` options without help: {bare}"


def test_the_readme_settings_table_is_the_settings_table() -> None:
    readme = (REPO / "README.md").read_text()
    table = markdown_table()
    assert table in readme, "README.md settings table is stale: paste the output of `python -m imgpipe.settings`"
    listed = set(re.findall(r"^\| `(IMGPIPE_\w+)` \|", readme, re.M))
    assert listed == {var.env for var in VARS}


# --- printed Redis URLs, Celery's warnings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://queue-host", "redis://queue-host"),
        ("redis://:s3cret@h:6379/0", "redis://:**@h:6379/0"),
        ("redis://user:s3cret@h/1", "redis://user:**@h/1"),
        ("redis://user@h/1", "redis://user@h/1"),
        ("rediss://:p%40w@h:6380/0?ssl_cert_reqs=none", "rediss://:**@h:6380/0?ssl_cert_reqs=none"),
        ("unix:///tmp/r.sock?password=x&db=1", "unix:///tmp/r.sock?password=**&db=1"),
    ],
)
def test_safe_url_masks_only_a_real_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_a_celery_worker_started_as_root_with_json_only_gets_imgpipes_line_not_celerys_warning() -> None:
    # A real Celery WorkController is built (no broker needed until it starts), as `imgpipe worker` builds it.
    code = """
import logging, os, sys, warnings
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
warnings.simplefilter("default")
from imgpipe.known_warnings import install
from imgpipe.broker import make_celery
from imgpipe.settings import RedisSettings
install()
app = make_celery("t", RedisSettings(url="redis://127.0.0.1:1/0"))
app.Worker(hostname="t@h", quiet=True, without_gossip=True, without_mingle=True, without_heartbeat=True)
from kombu import Connection
log = logging.getLogger("celery.worker.consumer.connection")
log.disabled = False
log.setLevel(logging.INFO)
log.addHandler(logging.StreamHandler(sys.stdout))
log.info("Connected to %s", Connection("redis://127.0.0.1:1/0").as_uri())
print("root" if os.geteuid() == 0 else "user")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "Connected to redis://127.0.0.1:1/0" in result.stdout and ":**@" not in result.stdout
    assert "superuser privileges" not in result.stderr + result.stdout
    if result.stdout.strip().endswith("root"):
        assert "running as root: this worker accepts JSON messages only" in result.stdout + result.stderr


def test_a_real_worker_log_has_no_celery_root_warning_and_no_made_up_password(tmp_path: Path, redis_url: str) -> None:
    with Workers(tmp_path, redis_env(redis_url, IMGPIPE_ALLOWED_ROOTS=str(tmp_path))) as workers:
        workers.start()
        log = workers.logs()
    assert "SecurityWarning" not in log and ":**@" not in log, log
    assert f"Connected to {redis_url}" in log
