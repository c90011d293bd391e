"""Prometheus metrics of a worker: the one place metric names are spelled (prefix ``imgpipe_``).

No label takes a file path, job id or any other unbounded value.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Images finished, by outcome: status is "ok" or "error". Counted once per image, even on redelivery.
IMAGES = Counter("imgpipe_images_total", "Images classified, by outcome", ["status"])
# Images per inference batch (cross-message batching shows as sizes above the message chunk size).
BATCH_SIZE = Histogram(
    "imgpipe_batch_size",
    "Images per inference batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
# Seconds per stage: decode (read + decode + preprocess, per image), infer (per batch), write (per message).
STAGE_SECONDS = Histogram(
    "imgpipe_stage_seconds",
    "Seconds spent per pipeline stage",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Failed images by bounded reason code (imgpipe.errors.ImageError.REASONS).
ERRORS = Counter("imgpipe_errors_total", "Images that failed, by reason", ["reason"])
# Messages moved to the dead-letter list after too many deliveries.
DEAD_LETTERS = Counter("imgpipe_dead_letters_total", "Messages dead-lettered after repeated failed deliveries")
# Messages (chunks of paths) waiting in the broker queue.
QUEUE_DEPTH = Gauge("imgpipe_queue_depth", "Messages waiting in the queue", multiprocess_mode="max")
# Model each worker serves: imgpipe_model_info{name, sha} 1. A Gauge, not an Info: Info does not
# work in prometheus_client's multiprocess mode.
MODEL_INFO = Gauge("imgpipe_model_info", "Model served by this worker", ["name", "sha"], multiprocess_mode="max")

STAGES = ("decode", "infer", "write")
