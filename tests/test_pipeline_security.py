"""Bad input and hostile messages never stop a real worker; passwords and TLS (rediss://) work end to end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from kombu import Connection
from PIL import Image

from imgpipe import keys
from imgpipe.jobs import create_job, iter_records, seal_job
from imgpipe.procs import wait_until
from imgpipe.producer.enqueue import enqueue_paths
from imgpipe.settings import RedisSettings
from tests.conftest import cli_env, free_port, run_cli
from tests.images import write_bad, write_bomb, write_good
from tests.workers import Workers, wait_for_job

TTL = 3600


def _job(client: redis.Redis, redis_url: str, paths: list[str], chunk_size: int = 8) -> str:
    job_id = create_job(client, None, kind="batch", roots=["/"], ttl_seconds=TTL)
    enqueue_paths(client, RedisSettings(url=redis_url), job_id, paths, chunk_size=chunk_size)
    seal_job(client, job_id)
    return job_id


def test_bad_files_and_escaping_paths_become_error_records_and_the_worker_keeps_serving(
    tmp_path: Path, redis_url: str, client: redis.Redis
) -> None:
    root = tmp_path / "root"
    good = [str(p) for p in write_good(root / "good", 20)]
    bad = write_bad(root / "bad")
    oversized = root / "bad" / "oversized.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)).save(oversized)
    assert oversized.stat().st_size > 50_000 > max(os.path.getsize(p) for p in good)
    bomb = write_bomb(root / "bad" / "bomb.png", side=3000)
    secret = tmp_path / "outside" / "secret.png"
    write_good(secret.parent, 1)[0].rename(secret)
    escape = root / "bad" / "escape.png"
    escape.symlink_to(secret)
    dotdot = str(root / "good" / ".." / ".." / "outside" / "secret.png")
    expected = {
        str(bad["truncated"]): "decode",
        str(bad["corrupt"]): "decode",
        str(bad["not_image"]): "decode",
        str(bad["empty"]): "empty",
        str(bad["missing"]): "not_found",
        str(bad["directory"]): "not_regular",
        str(oversized): "too_large",
        str(bomb): "too_many_pixels",
        str(escape): "not_allowed",
        dotdot: "not_allowed",
    }
    # Bad paths spread between good ones: each message mixes both, and the good ones are still labelled.
    paths = [p for pair in zip(good, [*expected, *[None] * 10], strict=True) for p in pair if p is not None]
    env = cli_env(
        IMGPIPE_REDIS_URL=redis_url,
        IMGPIPE_ALLOWED_ROOTS=str(root),
        IMGPIPE_MAX_FILE_BYTES="50000",
        IMGPIPE_MAX_PIXELS="1000000",
    )
    with Workers(tmp_path, env) as workers:
        worker = workers.start()
        job_id = _job(client, redis_url, paths)
        job = wait_for_job(client, job_id, timeout=60, workers=workers)
        assert (int(job["total"]), int(job["done"]), int(job["failed"])) == (30, 20, 10)
        records = {r["path"]: r for r in iter_records(client, job_id)}
        assert len(records) == 30
        assert {p: records[p].get("reason") for p in expected} == expected
        assert all(records[p]["status"] == "error" and records[p]["error"] for p in expected)
        assert all(records[p]["status"] == "ok" and records[p]["label"] for p in good)
        assert str(secret) not in records[str(escape)]["error"] + records[dotdot]["error"]  # says nothing of it

        # Still serving: the next job is classified, and `enqueue --wait` exits 1 when an image failed.
        again = _job(client, redis_url, good[:5])
        wait_for_job(client, again, timeout=60, workers=workers)
        failing = run_cli(
            "enqueue", str(bad["empty"]), str(good[0]), "--wait", env=cli_env(IMGPIPE_REDIS_URL=redis_url), timeout=60
        )
        assert failing.returncode == 1, failing.stderr
        assert "1 ok, 1 failed of 2" in failing.stderr
        assert worker.proc.poll() is None
        assert "Traceback" not in worker.log()


class _Exploit:
    """Unpickling this runs a shell command: what a pickle message could do to a worker that accepted it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_message_is_refused_and_the_worker_keeps_serving(
    tmp_path: Path, redis_url: str, client: redis.Redis
) -> None:
    data = tmp_path / "data"
    good = [str(p) for p in write_good(data, 6)]
    marker = tmp_path / "pwned"
    env = cli_env(IMGPIPE_REDIS_URL=redis_url, IMGPIPE_ALLOWED_ROOTS=str(data))
    with Workers(tmp_path, env) as workers:
        worker = workers.start()
        with Connection(redis_url) as conn:
            conn.Producer().publish(
                [["some-job", [_Exploit(marker)]], {}, {"callbacks": None, "errbacks": None, "chain": None}],
                routing_key=RedisSettings().queue,
                exchange="",
                serializer="pickle",
                headers={
                    "lang": "py",
                    "task": keys.TASK_CLASSIFY,
                    "id": "pickled-1",
                    "root_id": "pickled-1",
                    "parent_id": None,
                    "group": None,
                    "retries": 0,
                    "eta": None,
                    "expires": None,
                },
            )
        # Refused by the worker's transport.
        wait_until(
            lambda: "refused a message (content_type)" in worker.log(), 30, "pickle refused", check=worker.check_alive
        )
        job_id = _job(client, redis_url, good)
        job = wait_for_job(client, job_id, timeout=60, workers=workers)
        assert int(job["done"]) == 6
        assert not marker.exists()
        assert client.llen(RedisSettings().queue) == 0 and client.hlen("unacked") == 0  # dropped, not stuck
        assert worker.proc.poll() is None
        assert "application/x-python-serialize" in worker.log()


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1, made with the openssl command."""
    folder.mkdir()
    run = lambda *args: subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=imgpipe-test-ca",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    )
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A private redis-server that speaks only TLS and wants a password: (url without TLS options, CA file)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found: apt-get install -y openssl")
    ca, cert, key = _tls_files(tmp_path / "tls")
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret-pw",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server with TLS did not start"
                time.sleep(0.05)
        yield f"rediss://:s3cret-pw@127.0.0.1:{port}/0", ca
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_password_protected_tls_redis_works_end_to_end(tmp_path: Path, tls_redis: tuple[str, Path]) -> None:
    base, ca = tls_redis
    url = f"{base}?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    data = tmp_path / "data"
    write_good(data, 10)
    with Workers(tmp_path, cli_env(IMGPIPE_REDIS_URL=url, IMGPIPE_ALLOWED_ROOTS=str(data))) as workers:
        worker = workers.start()
        assert "s3cret-pw" not in worker.log()
        result = run_cli("enqueue", str(data), "--wait", env=cli_env(IMGPIPE_REDIS_URL=url), timeout=120)
        assert result.returncode == 0, result.stderr + workers.logs()
        assert "10 ok, 0 failed" in result.stderr

    wrong = run_cli("status", env=cli_env(IMGPIPE_REDIS_URL=url.replace("s3cret-pw", "wrong")), timeout=60)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "cannot use Redis at rediss://:**@127.0.0.1" in wrong.stderr and "wrong" not in wrong.stderr
    untrusted = run_cli("status", env=cli_env(IMGPIPE_REDIS_URL=base), timeout=60)  # server cert not trusted
    assert untrusted.returncode == 2 and "certificate verify failed" in untrusted.stderr, untrusted.stderr


def test_a_worker_without_allowed_roots_refuses_to_start(redis_url: str) -> None:
    result = run_cli("worker", env=cli_env(IMGPIPE_REDIS_URL=redis_url), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "imgpipe: error: no allowed roots: set IMGPIPE_ALLOWED_ROOTS or --allowed-roots to the directories "
        "this worker may read (colon-separated), e.g. --allowed-roots /data/photos"
    ]
