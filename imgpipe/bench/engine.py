"""The engine suite of `imgpipe bench`: the in-process engine against one-image-at-a-time and batch-only baselines."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgpipe.bench.results import SuiteResult, median_rate
from imgpipe.model.data import iter_images
from imgpipe.model.engine import Engine
from imgpipe.model.preprocess import stack


def write_photos(out: Path, count: int, size: tuple[int, int] = (2048, 1536), seed: int = 0) -> Path:
    """``count`` photo-sized JPEGs (smooth random colour fields, quality 90) to measure decode-heavy input."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = (rng.random((size[1] // 16, size[0] // 16, 3)) * 255).astype(np.uint8)  # (H/16, W/16, 3)
        Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(out / f"photo{i:04d}.jpg", quality=90)
    return out


def run_bench(
    engine: Engine, data: Path, *, images: int, batch_size: int, decode_threads: int, repeat: int, name: str = "engine"
) -> SuiteResult:
    """Images/s of three ways to classify ``images`` files from ``data`` (repeated to fill), median of ``repeat``."""
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
    result = SuiteResult(
        name,
        "images/s",
        f"{name}: {len(paths)} images from {data}, model {engine.model_id}, device {engine.device}, "
        f"torch threads {torch.get_num_threads()}, median of {repeat}",
        info={"images": len(paths)},
    )
    result.add(
        "baseline_batch1", median_rate(baseline, repeat), "baseline_batch1", "one image at a time: decode, then predict"
    )
    result.add(
        f"batched_{batch_size}",
        median_rate(batched_only, repeat),
        "baseline_batch1",
        f"batches of {batch_size}, decoded in the calling thread",
    )
    result.add(
        f"engine_batch{batch_size}_threads{decode_threads}",
        median_rate(engine_pipeline, repeat),
        "baseline_batch1",
        f"Engine.classify: {decode_threads} decode threads overlap batched inference",
    )
    return result
