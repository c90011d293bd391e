"""Serving several models: split-on-OOM in inference, reload without a restart, per-model queues (docs/models.md)."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import pytest
import redis
import torch

from imgpipe import keys
from imgpipe.jobs import iter_records
from imgpipe.model import export, modelfile
from imgpipe.model.engine import Engine
from imgpipe.procs import wait_until
from imgpipe.registry import live_workers
from imgpipe.settings import BatchSettings, SecuritySettings
from imgpipe.worker.batcher import Batcher
from tests.conftest import cli_env, free_port, run_cli
from tests.images import write_good
from tests.workers import assert_exactly_once, enqueue_cli, scrape, wait_for_job, workers_for


class FakeOOMModule(torch.nn.Module):
    """A fake of a GPU that fits only ``fits`` images (no GPU here): the real module below, but a batch above
    ``fits`` raises torch.cuda.OutOfMemoryError, as CUDA does."""

    def __init__(self, inner: torch.nn.Module, fits: int) -> None:
        super().__init__()
        self.inner = inner
        self.fits = fits
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake: {x.shape[0]} > {self.fits} images)")
        return self.inner(x)


@pytest.mark.timeout(120)
def test_fake_cuda_oom_splits_the_batch_and_charges_no_message(tmp_path: Path, default_model: Path) -> None:
    engine = Engine.load(default_model, "cpu", security=SecuritySettings(allowed_roots=(tmp_path,)))
    good = [str(p) for p in write_good(tmp_path / "good", 13)]
    expected = engine.records_for(good, [engine.load_image(p) for p in good])
    fake = FakeOOMModule(engine.module, fits=3)
    engine.module = fake  # type: ignore[assignment]
    batcher = Batcher(engine, BatchSettings(max_batch=64, max_wait_ms=500, decode_threads=2))
    # A batch that failed would raise here: that is what charges a message.
    records = batcher.run(good, [time.monotonic()] * len(good))
    assert max(fake.sizes) > 3, "the batch should have met the fake OOM"
    assert all(r["status"] == "ok" for r in records) and [r["path"] for r in records] == good
    for got, want in zip(records, expected, strict=True):  # same labels as the unsplit batch
        assert got["label"] == want["label"]
    # A single image that does not fit is a real failure: it re-raises (and is then charged as before).
    fake.fits = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.predict(engine.load_image(good[0]).unsqueeze(0))


def variant(source: Path, out: Path, name: str, nudge: float) -> str:
    """Another valid model file from ``source``: its network with one bias nudged (so the sha differs) under
    ``name``; returns its model id."""
    module, meta = modelfile.load(source)
    with torch.no_grad():
        bias = [p for n, p in module.named_parameters() if n.endswith("bias")][-1]
        bias.add_(nudge)
    written = export.export(
        module,
        out,
        name=name,
        arch=meta.arch,
        arch_config=meta.arch_config,
        labels=list(meta.labels),
        preset=meta.preset,
        val_accuracy=meta.val_accuracy,
    )
    return written.model_id


@pytest.mark.timeout(240)
def test_sighup_reloads_the_model_mid_job_losing_and_doubling_nothing(
    tmp_path: Path, redis_url: str, client: redis.Redis, default_model: Path
) -> None:
    data = tmp_path / "data"
    images = {str(p) for p in write_good(data, 600)}
    served = tmp_path / "models" / "served.pt"
    old_id = variant(default_model, served, "alpha", 0.0)
    new_id = variant(default_model, tmp_path / "models" / "next.pt", "beta", 1e-3)
    assert old_id != new_id and old_id.split("@")[1] != new_id.split("@")[1]
    port = free_port()
    env = {"IMGPIPE_MODEL": str(served), "IMGPIPE_MAX_BATCH": "1", "IMGPIPE_PREFETCH": "1"}
    with workers_for(tmp_path, redis_url, data, **env) as workers:
        worker = workers.start("--device", "cpu", "--metrics-port", str(port))
        assert f'imgpipe_model_info{{name="alpha",sha="{old_id[-12:]}"}} 1.0' in scrape(port)
        job_id = enqueue_cli(redis_url, str(data), "--chunk-size", "1")
        wait_until(lambda: client.hlen(keys.job_results(job_id)) >= 40, 120, "40 records")
        os.replace(tmp_path / "models" / "next.pt", served)  # a new version, complete at once
        os.kill(worker.pid, signal.SIGHUP)
        wait_until(lambda: "model reloaded" in worker.log(), 60, "the reload")
        assert client.hget(keys.job(job_id), "finished") is None, "the job ended before the reload: too short"
        before = client.hlen(keys.job_results(job_id))
        wait_for_job(client, job_id, timeout=180, workers=workers)
        records = assert_exactly_once(client, job_id, images)
        models = collections.Counter(r["model"] for r in records.values())
        assert set(models) == {old_id, new_id} and models[old_id] >= 40, models
        assert models[new_id] >= len(images) - before - 4, models  # at most a batch or so in hand at the switch
        assert f"model reloaded: {old_id} -> {new_id}" in worker.log()
        wait_until(lambda: [w.model for w in live_workers(client)] == [new_id], 30, "the heartbeat names beta")
        assert live_workers(client)[0].queues == ("imgpipe", keys.model_queue(new_id[-12:]))
        text = scrape(port)
        assert f'imgpipe_model_info{{name="beta",sha="{new_id[-12:]}"}} 1.0' in text, text
        assert f'imgpipe_model_info{{name="alpha",sha="{old_id[-12:]}"}} 0.0' in text, text

        # A file that fails its checks (truncated) is refused, and the worker goes on with the model it has.
        served.write_bytes(served.read_bytes()[:1000])
        os.kill(worker.pid, signal.SIGHUP)
        wait_until(lambda: "model reload refused" in worker.log(), 60, "the refusal")
        again = enqueue_cli(redis_url, str(data / "img00000.png"), "--model", new_id)  # re-subscribed: beta's queue
        wait_for_job(client, again, timeout=60, workers=workers)
        assert {r["model"] for r in iter_records(client, again)} == {new_id}
        worker.check_alive()


@pytest.mark.timeout(300)
def test_two_workers_two_models_pinned_jobs_get_their_model_and_status_names_an_unserved_pin(
    tmp_path: Path, redis_url: str, client: redis.Redis, default_model: Path
) -> None:
    folders = {name: tmp_path / name for name in ("a", "b", "any")}
    images = {name: {str(p) for p in write_good(folder, 60)} for name, folder in folders.items()}
    alpha = variant(default_model, tmp_path / "alpha.pt", "alpha", 0.0)
    beta = variant(default_model, tmp_path / "beta.pt", "beta", 1e-3)
    gamma = "gamma@0123456789ab"  # served by nobody
    assert keys.model_queue(alpha[-12:]) not in {"imgpipe", keys.JOBS, keys.WORKERS, keys.LEASES}

    refused = run_cli("enqueue", str(folders["a"]), "--model", "alpha", env=cli_env(IMGPIPE_REDIS_URL=redis_url))
    assert refused.returncode == 2 and "not a model id" in refused.stderr and "Traceback" not in refused.stderr

    # A job pinned to a model no live worker serves: accepted, and both enqueue and status say so.
    result = run_cli(
        "enqueue", str(folders["a"]), "--model", gamma, "--job", "for-gamma", env=cli_env(IMGPIPE_REDIS_URL=redis_url)
    )
    assert result.returncode == 0 and f"no live worker serves {gamma}" in result.stderr, result.stderr
    with workers_for(tmp_path, redis_url, tmp_path, IMGPIPE_MAX_BATCH="8") as workers:
        workers.start("--device", "cpu", IMGPIPE_MODEL=str(tmp_path / "alpha.pt"))
        workers.start("--device", "cpu", IMGPIPE_MODEL=str(tmp_path / "beta.pt"))
        jobs = {
            "a": enqueue_cli(redis_url, str(folders["a"]), "--chunk-size", "4", "--model", alpha),
            "b": enqueue_cli(redis_url, str(folders["b"]), "--chunk-size", "4", "--model", beta),
            "any": enqueue_cli(redis_url, str(folders["any"]), "--chunk-size", "4"),
        }
        for job_id in jobs.values():
            wait_for_job(client, job_id, timeout=120, workers=workers)
        models = {}
        for name, job_id in jobs.items():
            records = assert_exactly_once(client, job_id, images[name])
            models[name] = collections.Counter(r["model"] for r in records.values())
        assert models["a"] == {alpha: 60} and models["b"] == {beta: 60}, models
        assert set(models["any"]) <= {alpha, beta} and sum(models["any"].values()) == 60
        assert sorted(w.model for w in live_workers(client)) == [alpha, beta]
        for queue in (keys.model_queue(alpha[-12:]), keys.model_queue(beta[-12:])):
            assert client.llen(queue) == 0

        status = run_cli("status", "for-gamma", env=cli_env(IMGPIPE_REDIS_URL=redis_url))
        assert status.returncode == 0, status.stderr
        assert f"waiting: no live worker serves {gamma} (live: {alpha} x1, {beta} x1)" in status.stdout, status.stdout
        assert f"{gamma} (pinned)" in status.stdout
        table = run_cli("status", env=cli_env(IMGPIPE_REDIS_URL=redis_url))
        assert f"waiting: no live worker serves {gamma}" in table.stdout, table.stdout
        assert client.llen(keys.model_queue(gamma[-12:])) > 0  # its messages wait in its own queue


@pytest.mark.timeout(200)
def test_a_pinned_message_in_the_wrong_queue_is_sent_to_its_model_queue_not_processed(
    tmp_path: Path, redis_url: str, client: redis.Redis, default_model: Path
) -> None:
    from imgpipe.jobs import create_job, seal_job
    from imgpipe.producer.enqueue import Enqueuer, producer_app
    from imgpipe.settings import RedisSettings

    data = tmp_path / "data"
    images = {str(p) for p in write_good(data, 24)}
    alpha = variant(default_model, tmp_path / "alpha.pt", "alpha", 0.0)
    beta = variant(default_model, tmp_path / "beta.pt", "beta", 1e-3)
    job_id = create_job(client, None, kind="batch", roots=[str(data)], ttl_seconds=3600, pin=beta)
    # Published to the default queue although pinned (as by hand, or by an older producer).
    with Enqueuer(client, producer_app(RedisSettings(url=redis_url)), job_id, chunk_size=4, ttl_seconds=3600) as e:
        e.add(sorted(images))
    seal_job(client, job_id)
    beta_queue = keys.model_queue(beta[-12:])
    with workers_for(tmp_path, redis_url, data) as workers:
        first = workers.start("--device", "cpu", IMGPIPE_MODEL=str(tmp_path / "alpha.pt"))
        wait_until(lambda: client.llen(beta_queue) == 6, 60, "the 6 messages moved to beta's queue")
        assert client.hlen(keys.job_results(job_id)) == 0, "a worker serving alpha must not process them"
        assert alpha in first.log()
        workers.start("--device", "cpu", IMGPIPE_MODEL=str(tmp_path / "beta.pt"))
        wait_for_job(client, job_id, timeout=120, workers=workers)
        records = assert_exactly_once(client, job_id, images)
    assert {r["model"] for r in records.values()} == {beta}


@pytest.mark.timeout(60)
def test_reconcile_sends_a_pinned_jobs_lost_messages_to_its_model_queue(redis_url: str, client: redis.Redis) -> None:
    from imgpipe.jobs import add_pending, create_job

    pin = "beta@00112233aabb"
    job_id = create_job(client, None, kind="batch", roots=["/data"], ttl_seconds=3600, pin=pin)
    pipe = client.pipeline()
    add_pending(pipe, job_id, {"m1": ["/data/1.png"], "m2": ["/data/2.png"]}, 3600)
    pipe.execute()
    result = run_cli("reconcile", job_id, "--grace", "0", env=cli_env(IMGPIPE_REDIS_URL=redis_url))
    assert result.returncode == 0 and "2 lost messages" in result.stderr, result.stderr
    assert client.llen(keys.model_queue("00112233aabb")) == 2 and client.llen("imgpipe") == 0


@pytest.mark.timeout(150)
def test_reload_loads_a_replaced_model_file_without_a_signal_and_pinned_only_serves_just_the_models_queue(
    tmp_path: Path, redis_url: str, client: redis.Redis, default_model: Path
) -> None:
    """`imgpipe worker --reload --pinned-only`: the flags as their variables (IMGPIPE_RELOAD, IMGPIPE_PINNED_ONLY).
    The worker takes only its model's queue, before and after the reload; an unpinned job waits in the default
    queue for a worker that serves it, and `status` says none does."""
    served = tmp_path / "models" / "served.pt"
    old_id = variant(default_model, served, "alpha", 0.0)
    data = tmp_path / "data"
    images = {str(p) for p in write_good(data, 8)}
    unpinned = enqueue_cli(redis_url, str(data), "--chunk-size", "4")
    with workers_for(tmp_path, redis_url, tmp_path, IMGPIPE_MODEL=str(served)) as workers:
        worker = workers.start("--device", "cpu", "--reload", "--pinned-only")
        [me] = live_workers(client)
        assert me.model == old_id and me.queues == (keys.model_queue(old_id[-12:]),)
        new_id = variant(default_model, served, "beta", 1e-3)  # export writes a .tmp and renames it
        wait_until(lambda: f"model reloaded: {old_id} -> {new_id}" in worker.log(), 60, "the reload")
        wait_until(
            lambda: (
                [(w.model, w.queues) for w in live_workers(client)] == [(new_id, (keys.model_queue(new_id[-12:]),))]
            ),
            30,
            "the heartbeat names beta and its queue only",
        )
        pinned = enqueue_cli(redis_url, str(data), "--chunk-size", "4", "--model", new_id)
        wait_for_job(client, pinned, timeout=90, workers=workers)
        records = assert_exactly_once(client, pinned, images, queue=keys.model_queue(new_id[-12:]))
        assert {r["model"] for r in records.values()} == {new_id}
        assert client.llen("imgpipe") == 2 and client.hlen(keys.job_results(unpinned)) == 0
        status = run_cli("status", unpinned, env=cli_env(IMGPIPE_REDIS_URL=redis_url))
        assert "no live worker on queue 'imgpipe'" in status.stdout, status.stdout


@pytest.mark.parametrize("chosen", [None, 5], ids=["default", "IMGPIPE_CPU_INFER_BATCH=5"])
def test_a_cpu_batch_runs_in_pieces_the_caches_hold_with_the_same_predictions(
    default_model: Path, chosen: int | None
) -> None:
    """On the CPU a batch above IMGPIPE_CPU_INFER_BATCH (default defaults.CPU_INFER_BATCH) goes through the model
    in pieces of that size (a 224 px model ran half as fast per image in batches of 64 as in 32); every image
    keeps its prediction."""
    from imgpipe import defaults
    from imgpipe.settings import Settings

    env = {} if chosen is None else {"IMGPIPE_CPU_INFER_BATCH": str(chosen)}
    step = Settings.from_env(env).batch.cpu_infer_batch
    assert step == (chosen or defaults.CPU_INFER_BATCH)
    engine = Engine.load(default_model, "cpu", cpu_infer_batch=step)
    size = 2 * step + 3
    channels, side = engine.preset.channels, engine.preset.input_size
    batch = torch.randint(0, 256, (size, channels, side, side), dtype=torch.uint8)
    whole = engine._predict_rows(batch)  # one forward pass, as before
    sizes: list[int] = []
    rows = engine._predict_rows

    def counted(part: torch.Tensor) -> list[list[tuple[str, float]]]:
        sizes.append(int(part.shape[0]))
        return rows(part)

    engine._predict_rows = counted  # type: ignore[method-assign]
    pieces = engine.predict(batch)
    assert sizes == [step, step, 3]
    assert [[label for label, _ in top] for top in pieces] == [[label for label, _ in top] for top in whole]
    assert all(
        abs(p - q) < 1e-4 for a, b in zip(pieces, whole, strict=True) for (_, p), (_, q) in zip(a, b, strict=True)
    )
