"""Worker pieces without Redis: process/device plan, Celery settings, and the batcher on the real model."""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from imgpipe import threads
from imgpipe.broker import celery_config, ssl_options, task_time_limit, transport_options
from imgpipe.errors import ConfigError
from imgpipe.model.engine import Engine
from imgpipe.procs import wait_until
from imgpipe.settings import BatchSettings, RedisSettings, SecuritySettings, Settings
from imgpipe.worker import metrics
from imgpipe.worker.app import make_app, prefetch
from imgpipe.worker.batcher import Batcher
from imgpipe.worker.cli import plan_devices, share_cores, visible_gpus
from tests.images import write_bad, write_good


def test_device_plan_one_process_per_gpu_else_one_per_core_on_the_cpu() -> None:
    assert plan_devices("cpu", None) == ["cpu"] * threads.cpu_processes()
    assert plan_devices("cpu", 3) == ["cpu", "cpu", "cpu"]
    assert plan_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]
    with pytest.raises(ConfigError, match="valid: auto, cpu, cuda, cuda:N"):
        plan_devices("tpu", None)


def test_device_plan_without_a_gpu_is_the_cpu_or_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    assert plan_devices("auto", 2) == ["cpu", "cpu"]
    assert plan_devices("auto", None) == ["cpu"] * threads.cpu_processes()
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        plan_devices("cuda", None)


def test_a_host_without_gpu_device_nodes_has_no_gpu_without_importing_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    assert visible_gpus(tmp_path) == 0  # an empty /dev: no /dev/nvidia0, no /dev/kfd
    # The supervisor of CPU processes plans them without torch (a CPU host: no GPU device node here).
    code = "import sys; from imgpipe.worker import cli; cli.plan_devices('auto', None); print('torch' in sys.modules)"
    if visible_gpus() == 0:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "False"


def test_device_plan_with_gpus_is_one_process_per_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpus = torch.cuda.device_count()
    assert plan_devices("auto", None) == [f"cuda:{i}" for i in range(gpus)]
    assert plan_devices("cuda", gpus + 1)[-1] == "cuda:0"  # dealt round-robin


def test_celery_is_configured_for_late_acks_json_only_and_limits_below_the_visibility_timeout() -> None:
    settings = Settings(
        redis=RedisSettings(url="redis://:pw@host:6379/2", visibility_timeout=600),
        batch=BatchSettings(max_batch=32, decode_threads=2),
    )
    conf = make_app(settings).conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json" and conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    # The pool runs nothing (deliveries go to the group threads); kombu's prefetch count is 1 x the multiplier.
    assert conf.worker_pool == "threads" and conf.worker_concurrency == 1
    assert conf.worker_prefetch_multiplier == prefetch(settings) == 96  # a batch per lane and one filling
    assert not conf.worker_enable_prefetch_count_reduction
    assert conf.broker_transport_options["visibility_timeout"] == 600
    assert conf.task_soft_time_limit == task_time_limit(settings.redis) < conf.task_time_limit < 600
    assert conf.result_backend is None and conf.task_ignore_result
    assert transport_options(RedisSettings(visibility_timeout=3))["unacked_restore_interval"] == 1


def test_rediss_urls_verify_certificates_unless_told_otherwise() -> None:
    import ssl

    assert ssl_options("redis://h:6379/0") is None
    assert ssl_options("rediss://h:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert ssl_options("rediss://h/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem") == {
        "ssl_cert_reqs": ssl.CERT_NONE,
        "ssl_ca_certs": "/ca.pem",
    }
    with pytest.raises(ConfigError, match="valid: none, optional, required"):
        ssl_options("rediss://h/0?ssl_cert_reqs=maybe")
    assert celery_config(RedisSettings(url="rediss://h/0"))["broker_use_ssl"] is not None


def test_the_batcher_runs_one_batch_for_several_messages_on_any_number_of_lanes(
    tmp_path: Path, default_model: Path
) -> None:
    engine = Engine.load(default_model, "cpu", security=SecuritySettings(allowed_roots=(tmp_path,)))
    good = [str(p) for p in write_good(tmp_path / "good", 15)]
    bad = write_bad(tmp_path / "bad")
    batches_before = metrics.BATCH_SIZE.collect()[0].samples
    count_before = next(s.value for s in batches_before if s.name.endswith("_count"))
    batcher = Batcher(engine, BatchSettings(max_batch=64, max_wait_ms=500, decode_threads=2))
    # A group of three "messages" of five images each plus a bad file: one batch of the 15 good images.
    paths = [*good, str(bad["corrupt"])]
    records = batcher.run(paths, [time.monotonic()] * len(paths))
    assert [r["path"] for r in records] == paths
    assert records[:15] == engine.records_for(good, [engine.load_image(p) for p in good])  # same as one batch
    assert records[15]["status"] == "error" and records[15]["reason"] == "decode"
    samples = metrics.BATCH_SIZE.collect()[0].samples
    count_after = next(s.value for s in samples if s.name.endswith("_count"))
    assert count_after - count_before == 1, "the 15 images should form one batch"
    # Lanes: several threads run their own groups at once, in batches of max_batch, each in input order.
    small = Batcher(engine, BatchSettings(max_batch=4, decode_threads=3))
    groups = [good[i::3] for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda g: small.run(g, [time.monotonic()] * len(g)), groups))
    for group, got in zip(groups, results, strict=True):
        want = engine.records_for(group, [engine.load_image(p) for p in group])
        assert [r["label"] for r in got] == [r["label"] for r in want]
    assert small.health()["busy"] == 0 and small.health()["progress"] > 0
    # Past the deadline no image starts: what was done comes back, for the message to be given back as too slow.
    assert small.run(good, [time.monotonic()] * len(good), deadline=time.monotonic() - 1) == []


def test_one_device_parser_for_every_host_shape() -> None:
    from imgpipe.devices import parse_device, shared_gpus

    assert parse_device(" CUDA:1 ").resolve(gpus=2) == "cuda:1"
    assert parse_device("auto").resolve(gpus=0) == "cpu"
    assert parse_device("auto").plan(gpus=2, processes=None) == ["cuda:0", "cuda:1"]
    assert parse_device("cuda").plan(gpus=2, processes=3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert parse_device("cpu").plan(gpus=4, processes=2) == ["cpu", "cpu"]
    # Processes sharing a GPU are named (the worker warns: measured far slower than one process per GPU).
    assert shared_gpus(parse_device("cuda").plan(gpus=2, processes=3)) == {"cuda:0": 2}
    assert shared_gpus(parse_device("cuda:1").plan(gpus=2, processes=4)) == {"cuda:1": 4}
    assert shared_gpus(parse_device("auto").plan(gpus=2, processes=None)) == {}
    assert shared_gpus(["cpu", "cpu"]) == {}
    with pytest.raises(ConfigError, match=r"this host has 2 GPU\(s\), cuda:0..cuda:1"):
        parse_device("cuda:2").resolve(gpus=2)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        parse_device("cuda").plan(gpus=0, processes=None)
    for bad in ("tpu", "cuda:x", "cuda:", ""):
        with pytest.raises(ConfigError, match="valid: auto, cpu, cuda, cuda:N"):
            parse_device(bad)


def test_worker_processes_share_the_cores_unless_the_lanes_were_chosen() -> None:
    cpus = threads.available_cpus()
    settings = Settings(batch=BatchSettings(decode_threads=cpus))
    assert share_cores(settings, 1, explicit=False).batch.decode_threads == cpus  # one process keeps them all
    assert share_cores(settings, 2, explicit=False).batch.decode_threads == max(1, cpus // 2)
    assert share_cores(settings, 4 * cpus, explicit=False).batch.decode_threads == 1  # at least one lane each
    assert share_cores(settings, 2, explicit=True).batch.decode_threads == cpus  # IMGPIPE_DECODE_THREADS wins
    # Torch threads: the process's share of the cores over its lanes, unless IMGPIPE_TORCH_THREADS is set.
    assert share_cores(settings, 2, explicit=False).batch.torch_threads == 1
    assert share_cores(settings, 2, explicit=True).batch.torch_threads == 1  # more lanes than its share
    one_lane = Settings(batch=BatchSettings(decode_threads=1))
    assert share_cores(one_lane, 2, explicit=True).batch.torch_threads == max(1, cpus // 2)
    pinned = Settings(batch=BatchSettings(decode_threads=1, torch_threads=7))
    assert share_cores(pinned, 2, explicit=True).batch.torch_threads == 7
    assert share_cores(pinned, 1, explicit=False) == pinned
    assert share_cores(settings, 2, explicit=False).batch.max_batch == settings.batch.max_batch


def test_one_stuck_lane_shows_as_a_stall_while_the_other_lanes_go_on(tmp_path: Path, default_model: Path) -> None:
    engine = Engine.load(default_model, "cpu", security=SecuritySettings(allowed_roots=(tmp_path,)))
    good = [str(p) for p in write_good(tmp_path / "good", 6)]
    stuck, release = threading.Event(), threading.Event()
    real = engine.safe_load_image

    def load(path: str, reader: Any = None) -> Any:  # the first file hangs, as a read on a stalled mount does
        if path == good[0]:
            stuck.set()
            release.wait(60)
        return real(path, reader)

    engine.safe_load_image = load  # type: ignore[method-assign]
    batcher = Batcher(engine, BatchSettings(max_batch=4, decode_threads=2))
    with ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(batcher.run, good[:1], [time.monotonic()])
        assert stuck.wait(60)
        hung_since = batcher.health()["progress"]
        time.sleep(0.05)
        records = batcher.run(good[1:], [time.monotonic()] * 5)  # another lane goes on
        assert [r["status"] for r in records] == ["ok"] * 5 and batcher.last_progress > hung_since
        # The heartbeat's progress is the stuck lane's: the liveness check sees the stall (imgpipe/health.py).
        assert batcher.health()["progress"] == hung_since and batcher.health()["busy"] == 1
        release.set()
        assert blocked.result(60)[0]["status"] == "ok"
    assert batcher.health() == {"busy": 0, "progress": batcher.last_progress}


def test_untrusted_json_fails_only_with_value_error_even_nested_past_the_parsers_depth() -> None:
    from imgpipe.untrusted import loads

    assert loads(b'{"a": [1, 2]}') == {"a": [1, 2]}
    for text in ("[" * 100_000, b"\xff\xfe", "{", '{"a": 1}}'):
        with pytest.raises(ValueError):
            loads(text)


class _HeldPipeline:
    """Stands in for worker/pipeline.py's Pipeline around the group consumer's scheduling only (no Redis, no
    model): every delivery is leased as work at once, and each group's work holds the real WorkGate until the
    test lets that group go. The plan would have a group wait a minute to fill."""

    def __init__(self) -> None:
        from imgpipe.batching import Plan
        from imgpipe.worker.pipeline import WorkGate

        self.gate = WorkGate(64)
        self.stopping = threading.Event()
        self.batcher = SimpleNamespace(plan=lambda: Plan(64, 60.0))
        self.leased = 0
        self.started: queue.Queue[int] = queue.Queue()  # messages per group, as each group starts
        self.go = [threading.Event() for _ in range(8)]

    def lease_group(self, items: list[Any], queue_acks: Any) -> list[Any]:
        from imgpipe.worker.pipeline import WORK, Verdict, Work

        self.leased += len(items)
        return [Verdict(WORK, work=Work(i, item, list(item.message.paths), [])) for i, item in enumerate(items)]

    def work_group(self, work: list[Any], queue_acks: Any) -> list[Any]:
        from imgpipe.worker.pipeline import ACKED, Verdict

        weight = sum(len(w.good) for w in work)
        assert self.gate.acquire(weight, self.stopping)
        try:
            turn = self.started.qsize()
            self.started.put(len(work))
            self.go[turn].wait(60)
        finally:
            self.gate.release(weight)
        return [Verdict(ACKED) for _ in work]


def _delivery(number: int) -> SimpleNamespace:
    body = json.dumps([["job-1", [f"/data/{number}.png"]], {}, {}])
    return SimpleNamespace(headers={"id": f"m-{number}", "imgpipe_v": 2}, body=body, delivery_tag=f"t-{number}")


def test_a_group_waiting_to_fill_starts_as_soon_as_a_lane_frees_with_what_it_gathered() -> None:
    """worker/consumer.py Runner: while every lane is busy a new group gathers leased messages (its plan would
    wait a minute); the moment the lane frees it starts with what it has. Before, it waited out the plan's
    wait (up to IMGPIPE_MAX_WAIT_MS) with the core idle."""
    from imgpipe.messages import Limits
    from imgpipe.worker.consumer import Runner

    pipeline = _HeldPipeline()
    runner = Runner(pipeline, Limits(), group_images=64, threads=2, hold_images=1000).start()
    try:
        runner.put(_delivery(1))
        assert pipeline.started.get(timeout=30) == 1  # an idle worker starts at once
        runner.put(_delivery(2))
        runner.put(_delivery(3))
        # Both offered (three puts in all) and taken: the second lane's group holds them while it fills.
        wait_until(lambda: runner._leased.unfinished_tasks == 3 and runner._leased.empty(), 30, "the group filling")
        assert pipeline.started.empty()  # the lane is busy: the new group waits to fill
        pipeline.go[0].set()  # the first group's lane frees
        assert pipeline.started.get(timeout=30) == 2  # not a minute later: at once, with both messages
    finally:
        for event in pipeline.go:
            event.set()
        runner.close()


def test_under_a_latency_target_a_worker_holds_a_planned_batch_per_lane_unless_the_queue_has_a_backlog() -> None:
    """With IMGPIPE_MAX_LATENCY_MS the images a process holds follow the plan: a full hold at a steady rate made
    every group take all it held, so batches grew to the maximum whatever the plan said (p95 240 ms for a 50 ms
    target). A queue with more waiting than the plan holds is served with the full hold (a backlog is never
    throttled by a small plan); without a target the hold is the configured one."""
    from imgpipe.batching import BatchSizer
    from imgpipe.messages import Limits
    from imgpipe.worker.consumer import Runner

    sizer = BatchSizer(max_batch=64, max_wait_s=0.05, target_s=0.05)
    sizer.observe_batch(10, 0.01)  # 1 ms per image: 25 images per batch fit the 50 ms target
    assert sizer.plan().size == 25
    pipeline = _HeldPipeline()
    pipeline.batcher = SimpleNamespace(plan=sizer.plan, sizer=sizer)
    runner = Runner(pipeline, Limits(), group_images=64, threads=3, hold_images=192)  # 2 lanes; threads not started
    runner.put(_delivery(1))  # one image held, one path per message
    assert runner.room() == 3 * 25 - 1  # a planned batch in each lane and one filling
    runner.saw_backlog(3 * 25)  # as much waits as the plan holds: still the plan
    assert runner.room() == 3 * 25 - 1
    runner.saw_backlog(3 * 25 + 1)  # more: a backlog, taken at the full hold
    assert runner.room() == 192 - 1
    runner.saw_backlog(0)
    for _ in range(3):
        sizer.observe_batch(10, 0.05)  # slower batches: the plan shrinks, and the hold with it
    assert sizer.plan().size < 25 and runner.room() == 3 * sizer.plan().size - 1

    # The queue's messages count at the recent paths per message: 3 chunks of 32 paths are a backlog of 96 images.
    chunked = Runner(pipeline, Limits(), group_images=64, threads=3, hold_images=192)
    chunk = _delivery(2)
    chunk.body = json.dumps([["job-1", [f"/data/{i}.png" for i in range(32)]], {}, {}])
    chunked.put(chunk)
    chunked.saw_backlog(3)
    assert chunked.hold() == 192 and chunked.room() == (192 - 32) // 32
    chunked.saw_backlog(0)
    assert chunked.hold() == 3 * sizer.plan().size and chunked.room() == 0

    fixed = _HeldPipeline()
    fixed.batcher = SimpleNamespace(plan=fixed.batcher.plan, sizer=None)
    runner = Runner(fixed, Limits(), group_images=64, threads=3, hold_images=192)
    runner.put(_delivery(1))
    assert runner.room() == 192 - 1


def test_the_transport_takes_messages_in_one_step_and_says_how_many_are_left(client: Any) -> None:
    """TAKE_LUA (worker/transport.py) records what it takes as unacknowledged in kombu's format and ends its reply
    with the queue's length after the take: the backlog that the worker's hold reads."""
    from imgpipe.broker import Envelopes
    from imgpipe.worker.transport import TAKE_LUA

    envelopes = Envelopes()
    texts = [envelopes.text("job-1", [f"/data/{i}.png"], f"m-{i}", "q") for i in range(6)]
    client.lpush("q", *texts[1:])  # the first is the one BRPOP took
    take = client.register_script(TAKE_LUA)
    unbounded = [-1, 1]  # images left (-1: no bound), paths per message without a header
    reply = take(keys=["q", "unacked", "unacked_index"], args=[2, time.time(), *unbounded, texts[0]])
    assert len(reply) == 3 * 2 + 1 and reply[-1] == 5 - 2
    assert [json.loads(raw)["headers"]["id"] for raw in reply[1:-1:2]] == ["m-0", "m-1", "m-2"]
    tags = [tag.decode() for tag in reply[0:-1:2]]
    assert sorted(k.decode() for k in client.hkeys("unacked")) == sorted(tags)
    reply = take(keys=["q", "unacked", "unacked_index"], args=[10, time.time(), *unbounded])
    assert len(reply) == 3 * 2 + 1 and reply[-1] == 0
    client.lpush("q", "not json")
    assert take(keys=["q", "unacked", "unacked_index"], args=[1, time.time(), *unbounded]) == [b"", b"not json", 0]


def _ids(reply: list[Any]) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in reply[1:-1:2]]


def test_the_transport_takes_no_more_images_than_the_worker_may_hold_whatever_it_saw_before(client: Any) -> None:
    """A worker that has just served one-path messages (its estimate: 1 path per message) and may hold 128 more
    images takes 4 chunks of 32 from a chunked job, not 128 of them: TAKE_LUA counts each message by its
    imgpipe_paths header, pushes back the one that would go past the bound (it stays next in line) and leaves the
    rest to the other workers. Before, with 2 processes, one took all 10 chunks of a 300-photo job after a
    one-path job and the other idled (the job ran at 0.66 of the in-process rate, against 1.01)."""
    from imgpipe.broker import Envelopes
    from imgpipe.worker.transport import TAKE_LUA

    envelopes = Envelopes()
    chunks = [envelopes.text("job-1", [f"/d/{i}-{j}.jpg" for j in range(32)], f"c-{i}", "q") for i in range(10)]
    assert json.loads(chunks[0])["headers"]["imgpipe_paths"] == 32
    client.lpush("q", *chunks[1:])
    take = client.register_script(TAKE_LUA)
    reply = take(keys=["q", "unacked", "unacked_index"], args=[63, time.time(), 128, 1.0, chunks[0]])
    assert _ids(reply) == ["c-0", "c-1", "c-2", "c-3"] and reply[-1] == 6
    assert client.hlen("unacked") == 4  # the pushed-back chunk is not recorded as delivered
    reply = take(keys=["q", "unacked", "unacked_index"], args=[63, time.time(), 40, 1.0])
    assert _ids(reply) == ["c-4"] and reply[-1] == 5  # the first is taken whatever its size; the next is 24 too many
    # No room left: the first only (BRPOP's, which the worker asked for), nothing more taken and pushed back.
    first = client.rpop("q")
    reply = take(keys=["q", "unacked", "unacked_index"], args=[63, time.time(), 0, 1.0, first])
    assert _ids(reply) == ["c-5"] and reply[-1] == 4 and client.lindex("q", -1) == chunks[6].encode()

    # A message without the header (another producer) counts at the estimate, here the recent 32 per message.
    bare = [json.loads(text) for text in chunks[:4]]
    for message in bare:
        del message["headers"]["imgpipe_paths"]
    client.delete("q")
    client.lpush("q", *[json.dumps(m) for m in bare])
    reply = take(keys=["q", "unacked", "unacked_index"], args=[63, time.time(), 64, 32.0])
    assert _ids(reply) == ["c-0", "c-1"] and reply[-1] == 2
    # A header that is no count (text, negative, huge) is a hint at most: never below one image, never an error.
    odd = [json.loads(chunks[0]) for _ in range(3)]
    for message, value in zip(odd, ["lots", -5, 1e308], strict=True):
        message["headers"]["imgpipe_paths"] = value
    client.delete("q")
    client.lpush("q", *[json.dumps(m) for m in odd])
    reply = take(keys=["q", "unacked", "unacked_index"], args=[63, time.time(), 3, 2.0])
    assert len(_ids(reply)) == 2 and reply[-1] == 1  # "lots": the estimate 2, -5: 1 image; 1e308: pushed back


@pytest.mark.parametrize(
    ("sent", "expected"),
    [(1795803533.25, 1795803533.25), (1795803533, 1795803533.0), (True, None), (float("nan"), None),
     (float("inf"), None), (-1.0, None), (0, None), (1e12, None), ("1795803533", None), (None, None)],
)  # fmt: skip
def test_the_send_time_a_message_carries_dates_its_end_to_end_latency_only_when_it_is_a_plausible_time(
    sent: Any, expected: float | None
) -> None:
    from imgpipe.messages import Limits
    from imgpipe.worker.consumer import parse_delivery

    raw = _delivery(1)
    raw.headers["imgpipe_sent"] = sent
    item = parse_delivery(raw, Limits(), received=1.0)
    assert item.sent == expected and item.message.paths == ["/data/1.png"]  # served either way
