"""What one Redis costs per image: commands, CPU and memory for a real job, and what redis-benchmark sustains.

Runs on a private redis-server (never the user's): writes N small images, starts one real `imgpipe worker`,
runs `imgpipe enqueue DIR --wait`, and diffs Redis's INFO (commandstats, stats, cpu, memory) around the job; then
sums MEMORY USAGE of every imgpipe key left (the records kept for IMGPIPE_RESULT_TTL_DAYS), and runs
redis-benchmark against the same server. Prints one JSON object. docs/deploy.md (sizing) quotes its output.

    .venv/bin/python deploy/sizing/measure_redis.py --images 3000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from PIL import Image

from imgpipe.procs import WorkerProcess, imgpipe_argv
from imgpipe.scratch_redis import scratch_redis


def write_images(folder: Path, count: int) -> list[Path]:
    """Small PNGs under a path shaped like a real photo tree (the path length drives the record size)."""
    paths = []
    for i in range(count):
        path = folder / "photos" / "2026" / "11" / f"camera-{i % 4:02d}" / f"IMG_{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (24, 24), color=i % 256).save(path)
        paths.append(path)
    return paths


def info(client: redis.Redis) -> dict[str, Any]:
    return dict(client.info("everything"))


def commandstats(snapshot: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec) from INFO commandstats (redis-py parses them as cmdstat_<name>)."""
    return {
        k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in snapshot.items() if k.startswith("cmdstat_")
    }


def imgpipe_memory(client: redis.Redis) -> tuple[int, int, dict[str, int]]:
    """(bytes, keys, bytes by key kind) of every imgpipe:* key, by MEMORY USAGE (exact: SAMPLES 0)."""
    total, count, kinds = 0, 0, {}
    for key in client.scan_iter("imgpipe:*", count=1000):
        usage = int(client.memory_usage(key, samples=0) or 0)
        kind = re.sub(r"[0-9a-f-]{8,}", "ID", key.decode())
        kinds[kind] = kinds.get(kind, 0) + usage
        total += usage
        count += 1
    return total, count, kinds


def benchmark(port: int) -> dict[str, float]:
    """requests/s of redis-benchmark for the command kinds the pipeline uses (50 clients)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {}
    result = subprocess.run(
        [binary, "-p", str(port), "-q", "--csv", "-n", "200000", "-c", "50", "-t", "set,get,lpush,rpop,hset"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rates = {}
    for line in result.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 2 and cells[0] != "test":
            rates[cells[0]] = float(cells[1])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--chunk-size", type=int, default=32, help="paths per message (imgpipe enqueue's default)")
    args = parser.parse_args()
    chunk = ["--chunk-size", str(args.chunk_size)]
    with tempfile.TemporaryDirectory(prefix="imgpipe-sizing-") as tmp_name:
        tmp = Path(tmp_name)
        paths = write_images(tmp / "data", args.images)
        with scratch_redis(tmp / "redis") as server:
            url = server + "/0"
            client = redis.Redis.from_url(url)
            env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
            env.update(IMGPIPE_REDIS_URL=url, IMGPIPE_ALLOWED_ROOTS=str(tmp / "data"), PYTHONUNBUFFERED="1")
            # Queued, no worker yet: what a backlog holds in Redis per image (messages, pending index).
            empty = int(client.info("memory")["used_memory"])
            subprocess.run(imgpipe_argv("enqueue", str(tmp / "data"), *chunk), env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)  # fmt: skip
            queued = int(client.info("memory")["used_memory"]) - empty
            client.flushdb()
            with WorkerProcess(["--device", "cpu"], env, tmp / "worker.log") as worker:
                worker.wait_ready()
                time.sleep(3)  # past start-up: the idle loop only
                before = info(client)
                start = time.perf_counter()
                subprocess.run(
                    imgpipe_argv("enqueue", str(tmp / "data"), "--wait", *chunk), env=env, check=True,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800,
                )  # fmt: skip
                elapsed = time.perf_counter() - start
                after = info(client)
            memory, keys, kinds = imgpipe_memory(client)
            port = int(server.rsplit(":", 1)[1])
            rates = benchmark(port)
            client.close()
    n = args.images
    stats_before, stats_after = commandstats(before), commandstats(after)
    per_command = {
        name: round((calls - stats_before.get(name, (0, 0))[0]) / n, 3)
        for name, (calls, _) in sorted(stats_after.items())
        if calls - stats_before.get(name, (0, 0))[0] > 0
    }
    cpu = (after["used_cpu_user"] + after["used_cpu_sys"]) - (before["used_cpu_user"] + before["used_cpu_sys"])
    client_commands = after["total_commands_processed"] - before["total_commands_processed"]
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
                "redis_version": after["redis_version"],
                "images": n,
                "paths_per_message": args.chunk_size,
                "mean_path_bytes": round(sum(len(str(p)) for p in paths) / n, 1),
                "job_seconds": round(elapsed, 2),
                "worker_images_per_s": round(n / elapsed, 1),
                "client_commands_per_image": round(client_commands / n, 3),
                "commandstats_calls_per_image": per_command,
                "redis_cpu_ms_per_image": round(1000 * cpu / n, 4),
                "redis_images_per_s_at_one_core": round(n / cpu) if cpu > 0 else None,
                "kept_bytes_per_image": round(memory / n, 1),
                "kept_keys": keys,
                "kept_bytes_by_key": kinds,
                "queued_bytes_per_image": round(queued / n, 1),
                "used_memory_delta_per_image": round((after["used_memory"] - before["used_memory"]) / n, 1),
                "net_input_bytes_per_image": round(
                    (after["total_net_input_bytes"] - before["total_net_input_bytes"]) / n, 1
                ),
                "redis_benchmark_requests_per_s": rates,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
