"""Which inference settings are fastest on this device, and how decoding scales with threads: a table.

Run by scripts/gpu-check.sh before the bench (it needs only torch and imgpipe, no Redis). For each workload's
model (the demo digits CNN, a random mobilenet_v3_small at 224 px) and each setting of the engine (``SETTINGS``:
``model_thread``, every batch on one thread of the engine's own; ``pad_batches``, to a few sizes;
``jit_optimize``, the TorchScript graph executor's profiling and fusion; ``amp``, fp16 autocast;
``channels_last``), it times ``Engine.predict``:
  load      seconds to build the engine (model to the device, two warm-up batches);
  b64 ms    median milliseconds of one batch of 64 pre-decoded images, one thread;
  img/s xN  images/s with N fresh threads calling predict at once, as the engine's lanes do (None where one
            batch is so slow that N turns would outlast the budget four times);
  shapes s  seconds for 8 batches of 8 sizes not seen before (3 to 60 images): what odd batch sizes cost after
            the warm-up (with padding they pad to sizes the warm-up ran).
Then read + decode + preprocess (``Engine.safe_load_image``) with 1, 2, 4, 8 and 16 threads, as the engine does it
(small files one thread at a time, IMGPIPE_SERIAL_DECODE_BYTES) and with every file in parallel (that setting 0).

Usage: python -P scripts/gpu_configs.py DIGITS_DIR [--device cuda] [--json OUT] [--budget SECONDS]
Each measurement stops after --budget seconds (default 2), so the whole table takes about a minute.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from imgpipe import threads
from imgpipe.bench.workloads import photos_model, write_photos
from imgpipe.model import modelfile
from imgpipe.model.engine import Engine, select_device
from imgpipe.model.preprocess import stack
from imgpipe.scan import scan
from imgpipe.settings import default_model_path

# name -> Engine keyword arguments; "current" is the engine's default on this device, the others change one thing
# from it, except "plain", which is what the DataLoader peer does (one thread in the peer, though).
SETTINGS: dict[str, dict[str, bool | None]] = {
    "current": {},
    "lanes call model": {"model_thread": False},
    "no padding": {"pad_batches": False},
    "jit optimize on": {"jit_optimize": True},
    "fp32": {"amp": False},
    "contiguous": {"channels_last": False},
    "plain": {"jit_optimize": True, "amp": False, "channels_last": False, "model_thread": False, "pad_batches": False},
}
# Batch sizes of the "shapes s" column: none is 2 or 64 (the unpadded warm-up's), each pads to another size.
ODD_SIZES = (3, 6, 11, 20, 37, 45, 51, 60)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(call, budget: float, at_least: int = 3) -> list[float]:
    times: list[float] = []
    end = time.perf_counter() + budget
    while len(times) < at_least or time.perf_counter() < end:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _threaded_rate(work: Callable[[int], int], count: int, budget: float) -> float:
    """Items per second of ``count`` threads each calling ``work(lane)`` (it returns the items it did) until
    ``budget`` seconds have passed, at least once each."""
    done = [0]
    lock = threading.Lock()
    end = time.perf_counter() + budget

    def lane(index: int) -> None:
        while True:  # at least one call each, however late the thread starts
            items = work(index)
            with lock:
                done[0] += items
            if time.perf_counter() >= end:
                return

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=count) as pool:
        for future in [pool.submit(lane, k) for k in range(count)]:
            future.result()
    return done[0] / (time.perf_counter() - start)


def measure_setting(path: Path, device: torch.device, kwargs: dict, batch: torch.Tensor, lanes: int, budget: float):
    start = time.perf_counter()
    module, metadata = modelfile.load(path, device)
    engine = Engine(module, metadata, device, **kwargs)
    _sync(device)
    load_s = time.perf_counter() - start
    ms = statistics.median(_time_calls(lambda: engine.predict(batch), budget)) * 1000
    # The lanes take turns on a GPU: with slow batches the last turns alone would outlast the budget many times.
    rate = (
        _threaded_rate(lambda _lane: len(engine.predict(batch)), lanes, budget) if ms * lanes < 4000 * budget else None
    )
    start = time.perf_counter()
    for size in ODD_SIZES:
        engine.predict(batch[:size])
        if time.perf_counter() - start > 4 * budget:
            break
    shapes_s = time.perf_counter() - start
    return {
        "load_s": round(load_s, 2),
        "b64_ms": round(ms, 2),
        "rate": None if rate is None else round(rate, 1),
        "shapes_s": round(shapes_s, 2),
    }


def _decode_next(engine: Engine, paths: list[str], taken: Iterator[int], _lane: int) -> int:
    engine.safe_load_image(paths[next(taken) % len(paths)])
    return 1


def decode_scaling(engine: Engine, paths: list[str], budget: float) -> dict[int, float]:
    """Images/s of read + decode + preprocess with 1 to 16 threads."""
    return {
        count: round(
            _threaded_rate(functools.partial(_decode_next, engine, paths, itertools.count()), count, budget), 1
        )
        for count in (1, 2, 4, 8, 16)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("digits", type=Path, help="a folder of the demo digit PNGs (imgpipe demo-data)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--budget", type=float, default=2.0)
    args = parser.parse_args()
    device = select_device(args.device)
    torch.set_num_threads(threads.torch_threads(device.type))
    lanes = threads.decode_threads()
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, {lanes} lanes",
        flush=True,
    )
    out: dict = {"device": str(device), "lanes": lanes, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        photos = [str(p) for p in write_photos(Path(tmp) / "photos", 64)]
        models = {
            "digits": (default_model_path(), sorted(scan(args.digits))),
            "photos": (photos_model(Path(tmp) / "m.pt"), photos),
        }
        for name, (model, paths) in models.items():
            base = Engine.load(model, str(device))
            batch = stack([base.load_image(p) for p in paths[:64]])  # uint8 (64, C, H, W), as the lanes make
            table = {}
            print(f"\n{name}: {'setting':<18} {'load s':>7} {'b64 ms':>8} {f'img/s x{lanes}':>11} {'shapes s':>9}")
            for label, kwargs in SETTINGS.items():
                row = measure_setting(model, device, kwargs, batch, lanes, args.budget)
                table[label] = row
                cells = f"{row['load_s']:>7} {row['b64_ms']:>8} {row['rate']!s:>11} {row['shapes_s']:>9}"
                print(f"{name}: {label:<18} {cells}", flush=True)
            out["workloads"][name] = {"settings": table}
            serial = base.serial_decode_bytes
            for key, limit in (("decode_by_threads", serial), ("decode_by_threads_parallel", 0)):
                base.serial_decode_bytes = limit
                scaling = out["workloads"][name][key] = decode_scaling(base, paths, args.budget)
                rates = ", ".join(f"{k}: {v}" for k, v in scaling.items())
                print(
                    f"{name}: decode images/s by threads, small files serial up to {limit} bytes: {rates}", flush=True
                )
            base.serial_decode_bytes = serial
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
