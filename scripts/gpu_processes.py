"""How processes sharing one device divide it: the model alone (pre-made batches, no decoding, no Redis) in 1, 2
and 4 processes on the same device at once, images/s in all.

`imgpipe worker --concurrency N` on one GPU runs N processes, each with its own CUDA context. Without NVIDIA's MPS
the GPU time-slices between contexts rather than running their kernels side by side; this measures what that
costs for the bench's photos model (a random mobilenet_v3_small at 224 px, batches of 64), so that the README's
advice (one worker process per GPU, its lanes decoding in threads) rests on a number.

Each process loads the engine (its warm-up included), waits for the others at a barrier, then calls
``Engine.predict`` on one batch for --budget seconds. Run by scripts/gpu-check.sh --scaling.
Usage: python -P scripts/gpu_processes.py [--device cuda] [--budget SECONDS] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

BATCH = 64


def _run(model: str, device: str, budget: float, barrier, results) -> None:
    import torch

    from imgpipe.model.engine import Engine

    engine = Engine.load(Path(model), device, warm_batch=BATCH)
    channels, size = engine.preset.channels, engine.preset.input_size
    batch = torch.randint(0, 256, (BATCH, channels, size, size), dtype=torch.uint8)
    engine.predict(batch)
    barrier.wait()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        done += len(engine.predict(batch))
    results.put(done / (time.perf_counter() - start))


def shared_rate(model: Path, device: str, processes: int, budget: float) -> float:
    """Images/s of ``processes`` processes running the model on ``device`` at once, in all."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child of a CUDA parent
    barrier, results = context.Barrier(processes), context.Queue()
    children = [
        context.Process(target=_run, args=(str(model), device, budget, barrier, results)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    rates = [results.get(timeout=budget + 120) for _ in children]
    for child in children:
        child.join()
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--processes", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from imgpipe.bench.workloads import photos_model

    out: dict = {"device": args.device, "batch": BATCH, "rates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = photos_model(Path(tmp) / "m.pt")
        one = None
        for count in (int(n) for n in args.processes.split(",")):
            rate = shared_rate(model, args.device, count, args.budget)
            one = one or rate
            out["rates"][count] = round(rate, 1)
            print(
                f"photos model, {count} process(es) on {args.device}: {rate:,.0f} images/s in all "
                f"({rate / one:.2f}x one process)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
