"""The benchmark harness: the engine against naive baselines, measured in one run, reported as ratios."""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.data import iter_images, write_demo_dataset
from model.engine import Engine
from model.preprocess import stack


def _time(fn: Callable[[], int], repeat: int) -> float:
    """Median images/s of ``fn`` (which returns how many images it handled) over ``repeat`` runs."""
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        count = fn()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def run_bench(engine: Engine, data: Path | None, *, images: int, batch_size: int, decode_threads: int,
              repeat: int) -> str:
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
        if data is None:
            write_demo_dataset(Path(tmp))
            data = Path(tmp) / "val"
        files = [str(p.absolute()) for p in iter_images(data)]
        if not files:
            raise SystemExit(f"no images under {data}")
        paths = list(itertools.islice(itertools.cycle(files), images))

        def baseline() -> int:  # what a first script does: one image at a time, decode then predict
            for path in paths:
                engine.predict(stack([engine.load_image(path)]))
            return len(paths)

        def batched_only() -> int:  # batching without the decode pool
            for i in range(0, len(paths), batch_size):
                chunk = paths[i : i + batch_size]
                engine.predict(stack([engine.load_image(p) for p in chunk]))
            return len(paths)

        def engine_pipeline() -> int:  # imgpipe: thread-pool decode overlapped with batched inference
            return sum(1 for _ in engine.classify(paths, batch_size=batch_size, decode_threads=decode_threads))

        baseline()  # warm-up: page cache and the TorchScript executor
        results = {
            "baseline_batch1": _time(baseline, repeat),
            f"batched_{batch_size}": _time(batched_only, repeat),
            f"engine_batch{batch_size}_threads{decode_threads}": _time(engine_pipeline, repeat),
        }
    base = results["baseline_batch1"]
    lines = [f"imgpipe bench: {len(paths)} images from {data}, model {engine.model_id}, device {engine.device}, "
             f"torch threads {torch.get_num_threads()}, median of {repeat}",
             f"{'variant':<32} {'images/s':>10} {'vs baseline':>12}"]
    for name, rate in results.items():
        lines.append(f"{name:<32} {rate:10.0f} {rate / base:11.2f}x")
    lines.append(json.dumps({"images": len(paths), "rates": {k: round(v, 1) for k, v in results.items()},
                             "ratios": {k: round(v / base, 2) for k, v in results.items()}}))
    return "\n".join(lines)
