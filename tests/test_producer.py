"""Producer: streaming scan, job record, chunked enqueue by task name, watch, and the producer CLI (no worker)."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from watchdog.events import FileSystemEvent

from imgpipe import keys
from imgpipe.errors import ConfigError
from imgpipe.jobs import create_job, job_status, seal_job
from imgpipe.procs import ProcessError, wait_until
from imgpipe.producer.enqueue import chunked, enqueue_paths
from imgpipe.producer.watch import Watcher
from imgpipe.scan import distinct_roots, scan, scan_all
from imgpipe.settings import RedisSettings
from tests.conftest import REPO, cli_env, free_port, run_cli
from tests.images import write_good

TTL = 3600


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_scan_is_a_lazy_recursive_filter_by_extension(tmp_path: Path) -> None:
    wanted = {
        _touch(tmp_path / "a.png"),
        _touch(tmp_path / "B.JPG"),
        _touch(tmp_path / "x" / "y" / "z" / "c.jpeg"),
        _touch(tmp_path / "x" / "d.WebP"),
    }
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / "x" / "archive.png.gz")
    (tmp_path / "dir.png").mkdir()  # a folder with an image name is walked, not yielded
    _touch(tmp_path / "dir.png" / "inner.bmp")
    wanted.add(tmp_path / "dir.png" / "inner.bmp")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    _touch(outside / "elsewhere.png")
    (tmp_path / "linked-dir").symlink_to(outside, target_is_directory=True)  # not followed
    (tmp_path / "link.png").symlink_to(outside / "elsewhere.png")  # yielded: the worker checks its target
    wanted.add(tmp_path / "link.png")

    found = scan(tmp_path)
    assert isinstance(found, types.GeneratorType)
    paths = list(found)
    assert len(paths) == len(set(paths))
    assert set(paths) == {str(p) for p in wanted}
    assert all(os.path.isabs(p) for p in paths)


def test_scan_reports_unreadable_folders_and_goes_on(tmp_path: Path) -> None:
    _touch(tmp_path / "ok" / "a.png")
    errors: list[str] = []
    paths = list(scan_all([tmp_path / "ok", tmp_path / "ok" / "a.png"], on_error=lambda p, e: errors.append(p)))
    assert paths == [str(tmp_path / "ok" / "a.png")]  # the file inside the folder is not sent twice
    list(scan(tmp_path / "gone", on_error=lambda p, e: errors.append(p)))
    assert errors == [str(tmp_path / "gone")]


def test_distinct_roots_drops_nested_and_repeated_inputs(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    _touch(tmp_path / "c.png")
    roots = distinct_roots([tmp_path / "a" / "b", tmp_path / "a", tmp_path / "a", tmp_path / "c.png"])
    assert roots == [str(tmp_path / "a"), str(tmp_path / "c.png")]
    with pytest.raises(ConfigError, match="no such file"):
        distinct_roots([tmp_path / "nope"])


def test_chunked_is_lazy_and_exact() -> None:
    def numbers() -> types.GeneratorType[str, None, None]:
        yield from (str(i) for i in range(10))

    assert [len(c) for c in chunked(numbers(), 4)] == [4, 4, 2]
    assert list(chunked([], 4)) == []
    with pytest.raises(ValueError):
        list(chunked(["a"], 0))


def test_enqueue_sends_chunks_by_task_name_as_json(client: redis.Redis, redis_url: str) -> None:
    settings = RedisSettings(url=redis_url)
    job_id = create_job(client, "job-1", kind="batch", roots=["/data"], ttl_seconds=TTL)
    paths = (f"/data/{i // 1000}/img{i:06d}.png" for i in range(20_000))
    start = time.perf_counter()
    images, messages = enqueue_paths(client, settings, job_id, paths, chunk_size=32)
    elapsed = time.perf_counter() - start
    print(f"enqueued {images} paths in {elapsed:.2f} s: {images / elapsed:,.0f} paths/s")
    assert (images, messages) == (20_000, 625)
    assert client.llen(settings.queue) == 625
    assert int(client.hget(keys.job(job_id), "total") or 0) == 20_000

    # What a worker receives: a Celery protocol-2 JSON message naming the task, args [job, paths].
    raw = json.loads(client.lindex(settings.queue, -1) or b"")  # the oldest message
    assert raw["content-type"] == "application/json"
    assert raw["headers"]["task"] == keys.TASK_CLASSIFY
    body = raw["body"]
    args, kwargs, _embed = json.loads(
        base64.b64decode(body) if raw["properties"]["body_encoding"] == "base64" else body
    )
    assert args == [job_id, [f"/data/0/img{i:06d}.png" for i in range(32)]]
    assert kwargs == {}

    sent: list[str] = []
    for item in client.lrange(settings.queue, 0, -1):
        message = json.loads(item)
        sent += json.loads(base64.b64decode(message["body"]))[0][1]
    assert len(sent) == len(set(sent)) == 20_000


def test_messages_built_directly_are_field_for_field_what_celery_send_task_writes(
    client: redis.Redis, redis_url: str
) -> None:
    """The Enqueuer builds its messages itself (imgpipe.broker.Envelopes: a tenth of send_task's cost); what
    lands in Redis must be what Celery and kombu write, every field and type, but for ids, tags and times."""
    from imgpipe.broker import Envelopes, publish
    from imgpipe.producer.enqueue import producer_app

    settings = RedisSettings(url=redis_url)
    app = producer_app(settings)
    # text, a byte name's lossless form, and what JSON and the envelope's template must escape
    paths = ["/data/caf\u00e9.png", "/data/\udcff.png", "/data/x.png", '/data/{id} "q" \\ \x01\n\U0001f600.png']
    publish(app, "job-1", paths, "m-celery")
    client.lpush(settings.queue, Envelopes().text("job-1", paths, "m-direct", settings.queue))
    direct, celery = (json.loads(item) for item in client.lrange(settings.queue, 0, 1))
    client.delete(settings.queue)

    volatile = {"id", "root_id", "correlation_id", "delivery_tag", "reply_to", "origin", "imgpipe_sent"}

    def shape(message: dict[str, object]) -> object:
        if isinstance(message, dict):
            return {k: (type(v).__name__ if k in volatile else shape(v)) for k, v in message.items()}
        return message

    body = {m["headers"]["id"]: json.loads(base64.b64decode(m.pop("body"))) for m in (direct, celery)}
    assert shape(direct) == shape(celery)
    assert list(direct) == list(celery) and list(direct["headers"]) == list(celery["headers"])
    assert body["m-direct"] == body["m-celery"] == [["job-1", paths], {}, body["m-celery"][2]]
    assert direct["headers"]["id"] == direct["headers"]["root_id"] == direct["properties"]["correlation_id"]
    assert direct["headers"]["argsrepr"] == celery["headers"]["argsrepr"]


def test_envelopes_fill_their_template_as_json_dumps_would() -> None:
    """Envelopes serialises the envelope once per queue and fills in each message's values: the text must be
    what json.dumps writes for the same message, whatever the queue name and paths hold."""
    from imgpipe.broker import Envelopes

    envelopes = Envelopes()
    for queue in ("imgpipe", 'odd{queue} "name"'):
        for paths in (["/a.png"], ["/{0}.png", '/"}{".png', "/\\u0001x\\u0001.png", "/\udcff\u00e9.png"]):
            text = envelopes.text("job-1", paths, "m-1", queue)
            message = json.loads(text)
            assert text == json.dumps(message)
            assert json.loads(base64.b64decode(message["body"]))[0] == ["job-1", paths]
            assert message["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}
            tag = message["properties"]["delivery_tag"]
            assert str(uuid.UUID(tag)) == tag and uuid.UUID(tag).version == 4


def test_job_lifecycle_total_seal_and_finish(client: redis.Redis) -> None:
    job_id = create_job(client, None, kind="batch", roots=["/x"], ttl_seconds=TTL)
    with pytest.raises(ConfigError, match="already exists"):
        create_job(client, job_id, kind="batch", roots=["/x"], ttl_seconds=TTL)
    with pytest.raises(ConfigError, match="not valid"):
        create_job(client, "../etc", kind="batch", roots=["/x"], ttl_seconds=TTL)
    assert 0 < client.ttl(keys.job(job_id)) <= TTL
    status = job_status(client, job_id)
    assert (status.total, status.state, status.rate, status.eta) == (0, "enqueuing", None, None)
    seal_job(client, job_id)
    status = job_status(client, job_id)
    assert status.finished and status.state == "done" and status.eta == 0.0  # nothing to wait for
    with pytest.raises(ConfigError, match="no such job"):
        job_status(client, "nope")


def test_producer_imports_neither_torch_nor_the_worker() -> None:
    code = (
        "import sys, imgpipe.producer.cli, imgpipe.producer.enqueue, imgpipe.producer.watch, imgpipe.jobs\n"
        "import imgpipe.scan\n"
        "bad = sorted(m for m in sys.modules if m.partition('.')[0] in ('torch', 'torchvision')\n"
        "             or m.startswith(('imgpipe.worker', 'imgpipe.model')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_cli_enqueue_prints_the_job_id_and_status_shows_it(tmp_path: Path, redis_url: str) -> None:
    write_good(tmp_path / "data" / "a", 7)
    write_good(tmp_path / "data" / "a" / "b", 5, start=7)
    _touch(tmp_path / "data" / "readme.txt")
    env = cli_env(IMGPIPE_REDIS_URL=redis_url)
    result = run_cli("enqueue", str(tmp_path / "data"), "--chunk-size", "5", "--job", "photos", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "photos\n"
    assert "enqueued 12 images in 3 messages" in result.stderr

    shown = run_cli("status", "photos", "--json", env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert (status["total"], status["done"], status["failed"], status["state"]) == (12, 0, 0, "queued")
    listed = run_cli("status", env=env, timeout=60)
    assert "photos" in listed.stdout and "queued" in listed.stdout

    again = run_cli("enqueue", str(tmp_path / "data"), "--job", "photos", env=env, timeout=60)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        "imgpipe: error: job 'photos' already exists; choose another --job id (`imgpipe status` lists jobs)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "/no/such/folder"], "no such file or directory: /no/such/folder"),
        (["status", "nojob"], "no such job: 'nojob'"),
        (["results", "nojob"], "no such job: 'nojob'"),
        (["watch", "/no/such/folder"], "not a directory: /no/such/folder"),
    ],
)
def test_producer_mistakes_exit_2_with_one_line(args: list[str], message: str, redis_url: str) -> None:
    result = run_cli(*args, env=cli_env(IMGPIPE_REDIS_URL=redis_url), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_redis_is_one_line_with_the_password_masked(tmp_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = run_cli("enqueue", str(tmp_path), env=cli_env(IMGPIPE_REDIS_URL=url), timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("imgpipe: error: cannot use Redis at redis://:**@127.0.0.1:")
    assert "hunter2" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@contextlib.contextmanager
def _watching(watcher: Watcher) -> Iterator[Watcher]:
    """``watcher`` run on a thread of its own, its observer watching when the block starts; stopped after it."""
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.3)  # the observer is watching
        yield watcher
    finally:
        stop.set()
        thread.join(timeout=30)


def test_watcher_sends_each_file_once_when_completely_written(tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    root.mkdir()
    seen: list[tuple[str, int]] = []
    watcher = Watcher(str(root), on_ready=lambda p: seen.append((p, os.path.getsize(p))), settle_s=1.0)
    with _watching(watcher):
        _touch(root / "quick.png", b"a" * 100)  # written and closed at once
        (root / "sub").mkdir()  # a new folder is watched too
        _touch(root / "sub" / "deep.jpg", b"b" * 50)
        _touch(root / "ignored.txt", b"text")
        with open(root / "slow.png", "wb") as slow:  # still being written past the settle time
            slow.write(b"c" * 10)
            slow.flush()
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                time.sleep(0.1)
                slow.write(b"c" * 10)
                slow.flush()
                assert str(root / "slow.png") not in [p for p, _ in seen]
        staged = tmp_path / "staged.png"
        _touch(staged, b"d" * 30)
        staged.rename(root / "moved.png")  # moved in whole
        with contextlib.suppress(ProcessError):
            wait_until(lambda: len(seen) >= 4, 10, "four files seen")
        (root / "quick.png").write_bytes(b"a" * 200)  # rewritten later: already sent, not sent again
        time.sleep(1.5)
    sizes = dict(seen)
    assert len(seen) == len(sizes) == 4, seen
    assert sizes[str(root / "quick.png")] == 100
    assert sizes[str(root / "sub" / "deep.jpg")] == 50
    assert sizes[str(root / "slow.png")] == os.path.getsize(root / "slow.png") > 100
    assert sizes[str(root / "moved.png")] == 30


def test_watcher_is_not_woken_by_reads_of_the_files_it_watches(tmp_path: Path) -> None:
    """The workers open, read and close every file the watcher sent; those must raise no events in it (with
    inotify, its event filter is the kernel's mask). They did: an open and a close reached its handler per image
    read, and a watched stream of small files ran at about three quarters of its rate (digits: 3,800 against
    5,100 img/s)."""
    root = tmp_path / "incoming"
    image = _touch(root / "sent.png", b"x" * 10)  # there before the watch: no event of its own
    watcher = Watcher(str(root), on_batch=lambda paths: None)
    kinds: list[tuple[str, str]] = []
    handle = watcher.on_any_event

    def counted(event: FileSystemEvent) -> None:
        kinds.append((event.event_type, os.fsdecode(event.src_path)))
        handle(event)

    watcher.on_any_event = counted
    with _watching(watcher):
        for _ in range(50):
            image.read_bytes()  # as a worker reads it
        last = _touch(root / "last.png", b"y" * 10)  # after the reads: its events come after theirs
        wait_until(lambda: ("closed", str(last)) in kinds or None, 10, "the new file's close seen")
    assert not [k for k in kinds if k[1] == str(image)], kinds
    assert {kind for kind, _ in kinds} <= {"created", "modified", "closed"}, kinds


def test_watcher_sends_every_file_of_a_burst_past_the_kernels_event_queue_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """inotify keeps at most fs.inotify.max_queued_events (16,384 by default) events unread and drops the rest:
    40,000 files moved in at once by another process lost thousands of events, and those files were never
    sent. watchdog reports the loss; the watcher then rescans the folder and sends the files no event named."""
    count = 40_000
    root, outside = tmp_path / "incoming", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for i in range(count):
        (outside / f"{i:06d}.png").write_bytes(b"p")
    seen: list[str] = []
    watcher = Watcher(str(root), on_batch=seen.extend, settle_s=0.2)
    with _watching(watcher):
        mover = f"import os\nfor i in range({count}): os.rename('{outside}/%06d.png' % i, '{root}/%06d.png' % i)"
        subprocess.run([sys.executable, "-c", mover], check=True, timeout=120)  # as fast as a `mv` of each
        wait_until(lambda: len(seen) >= count or None, 60, "every file sent")
        time.sleep(0.5)  # nothing more comes
    assert len(seen) == len(set(seen)) == count
    assert set(seen) == {str(root / f"{i:06d}.png") for i in range(count)}
    overflowed = any("overflow" in r.getMessage().lower() for r in caplog.records if r.name.startswith("watchdog"))
    assert (watcher.recovered > 0) == overflowed, (watcher.recovered, overflowed)


def test_watcher_rescans_for_files_no_event_named_and_leaves_those_there_before_it(tmp_path: Path) -> None:
    """A rescan (every IMGPIPE_WATCH_RESCAN_S) takes files that changed since the watch began and that no event
    named (here: no watch left on the folder), never one that was there before it began."""
    root = tmp_path / "incoming"
    before = _touch(root / "before.png", b"b" * 10)
    time.sleep(0.1)  # older than the watch by more than its allowance for coarse file times
    seen: list[str] = []
    watcher = Watcher(str(root), on_batch=seen.extend, settle_s=0.1, rescan_s=1)
    with _watching(watcher):
        _touch(root / "heard.png", b"h" * 10)
        wait_until(lambda: str(root / "heard.png") in seen or None, 10, "the file an event named")
        watcher._observer.unschedule_all()  # events stop: as when the kernel drops them
        unheard = _touch(root / "unheard.png", b"u" * 10)
        wait_until(lambda: str(unheard) in seen or None, 10, "the file found by the periodic rescan")
        time.sleep(1.5)  # another rescan: nothing sent twice, the older file still left alone
    assert seen == [str(root / "heard.png"), str(unheard)], seen
    assert str(before) not in seen and watcher.recovered == 1


def test_watcher_sends_files_renamed_in_at_once_and_forgets_a_folder_moved_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rename is atomic: a file renamed into the tree from outside it is complete and goes out at once, not
    after the settle time a created file waits (it waited 0.5 s, the default, before inotify's full move events).
    A folder moved out of the tree takes its files not yet sent with it, and nothing outside the tree is read
    (its move has no destination: scanning that would have scanned the current folder)."""
    root, outside = tmp_path / "incoming", tmp_path / "outside"
    root.mkdir()
    seen: list[str] = []
    watcher = Watcher(str(root), on_batch=seen.extend, settle_s=30.0)
    with _watching(watcher):
        staged = [_touch(outside / f"cam{i}.png", b"p" * 100) for i in range(3)]
        landed = time.monotonic()
        for path in staged:
            path.rename(root / path.name)
        wait_until(lambda: len(seen) >= 3 or None, 10, "the renamed files sent")
        assert time.monotonic() - landed < 10 < watcher.settle_s  # sent long before they could have settled
        assert sorted(seen) == sorted(str(root / p.name) for p in staged)

        (root / "batch").mkdir()
        with open(root / "batch" / "half.png", "wb") as half:  # still being written: it waits to settle
            half.write(b"h" * 10)
            half.flush()
            time.sleep(0.3)
            assert str(root / "batch" / "half.png") not in seen
            (root / "batch").rename(outside / "batch")  # moved out before it settled: never sent
            time.sleep(1.0)  # watchdog holds a move out of the tree for 0.5 s, looking for its other half
        time.sleep(0.5)  # its close, reported under its old path, is checked and dropped
    assert len(seen) == 3, seen
    assert not watcher._pending, watcher._pending
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
