"""Every default setting of imgpipe, written once, each with what it is for."""

# Broker and result store; a local Redis is what a first-time user has.
REDIS_URL = "redis://localhost:6379/0"
# Celery queue the producers send to and the workers consume.
QUEUE = "imgpipe"
# Device for inference: "auto" picks cuda:0 when a GPU is visible, else the CPU.
DEVICE = "auto"
# Images per inference batch.
MAX_BATCH = 64
# Images per forward pass on the CPU: larger batches are run in pieces of this size. Measured on 2 x86-64
# cores, one torch thread: mobilenet_v3_small at 224 px ran 715 img/s in batches of 16 or 32 and 330 img/s in
# batches of 64 (its activations past the caches); the digits CNN ran the same at 32 and 64.
CPU_INFER_BATCH = 32
# Files up to this many bytes are read, decoded and preprocessed by one lane at a time (0: never). Such an image
# is mostly Python (reading, Pillow's setup, the preset), and lanes doing it at once hand the GIL to each other at
# every system call: on 2 x86-64 cores the demo digits decoded at ~12,000 img/s on one thread and ~5,000 on two
# (on a 16-core GPU host: 7,474 on one, 2,285 on 16; scripts/gpu_configs.py prints both ways). A larger file's
# decoding releases the GIL and runs in parallel (640x480 JPEGs are 50-100 kB).
SERIAL_DECODE_BYTES = 16384
# Longest a worker waits to fill a batch before running a partial one (milliseconds).
MAX_WAIT_MS = 50
# Threads that read and decode images (Pillow releases the GIL while decoding); 0: one per available core
# (affinity and cgroup quota, imgpipe/threads.py), up to DECODE_THREADS_MAX.
DECODE_THREADS = 0
# Paths per queue message sent by `imgpipe enqueue`.
CHUNK_SIZE = 32
# Largest image file a worker will read (bytes).
MAX_FILE_BYTES = 64 * 1024 * 1024
# Largest decoded image (pixels); bigger headers are refused before decoding (decompression bombs).
MAX_PIXELS = 64 * 1024 * 1024
# Seconds before Redis redelivers a message a worker took but never acknowledged.
VISIBILITY_TIMEOUT = 3600
# Seconds a Redis reply may take before the connection is dropped and the command retried on a new one: a peer
# gone without closing (NAT or firewall timeout, failover) otherwise holds a thread forever.
REDIS_SOCKET_TIMEOUT = 10
# Deliveries of one message before it is dead-lettered and its images reported failed.
MAX_DELIVERIES = 3
# Messages one worker process holds at once: (lanes + 1) x max batch, so a group fills while every lane (decode
# thread) runs one, even when each message carries a single image (`imgpipe watch`; worker/app.py).
# Fraction of the visibility timeout a message may take before the worker gives it back (task time limit).
TASK_TIME_LIMIT_FRACTION = 0.8
# Seconds a new file's size must stay unchanged before `imgpipe watch` sends it (when no close event says so).
WATCH_SETTLE_MS = 500
# Seconds between refreshes of `imgpipe status --watch` and `imgpipe enqueue --wait`.
STATUS_REFRESH_S = 0.5
# Seconds between the progress lines `imgpipe status --watch` and `enqueue --wait` print when not on a terminal.
STATUS_LINE_EVERY_S = 10.0
# Seconds with no worker finishing any image while a job waits before `imgpipe status` says the queue is stalled.
STALL_S = 30.0
# Address the worker's /metrics endpoint binds to.
METRICS_BIND = "0.0.0.0"
# Seconds between the exporter's background reads of Redis.
EXPORTER_SAMPLE_S = 5.0
# Seconds of history behind a "recent" rate (exporter, status): smooths batch bursts, still follows load.
RATE_WINDOW_S = 60.0
# Port of `imgpipe exporter`'s /metrics (queue depth, backlog, drain time).
EXPORTER_PORT = 9808
# File name of the demo model bundled in imgpipe.model.assets (used when IMGPIPE_MODEL is not set).
BUNDLED_MODEL = "digits-cnn.pt"
# Seconds between a worker's heartbeats in the registry (imgpipe/registry.py).
HEARTBEAT_INTERVAL_S = 2.0
# Seconds a heartbeat lives: a worker silent this long is taken for dead.
HEARTBEAT_TTL_S = 10.0
# Folder (under the temporary directory) where each worker process keeps its health sentinel file fresh;
# `imgpipe worker --check` reads every sentinel in it (IMGPIPE_HEALTH_DIR names another folder).
HEALTH_DIR_NAME = "imgpipe-health"
# Seconds a worker may hold images without resolving any before its health check calls it hung (a batch on a
# slow CPU takes seconds; a wedged decode or inference never ends).
HEALTH_STALL_S = 120.0
# Labels returned per image.
TOPK = 3
# Days a job's records and counters are kept in Redis.
RESULT_TTL_DAYS = 7
# Extensions the producer treats as images (lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Most decode threads chosen automatically (IMGPIPE_DECODE_THREADS=0): past this, reading and Python overhead bound.
DECODE_THREADS_MAX = 16
# Memory a default CPU worker process is sized at (one per core, as many as memory allows): a worker process
# with the torch wheel loaded holds ~330 MB of its own; the rest is room for the batches in work.
CPU_PROCESS_MEMORY = 1 << 30
# Torch intra-op threads of an engine; 0: chosen from the cores and the device (imgpipe/threads.py).
TORCH_THREADS = 0
# OpenMP wait policy set before torch loads (unless OMP_WAIT_POLICY is set): idle threads sleep, not spin.
OMP_WAIT_POLICY = "PASSIVE"
# Adaptive batching: target p95 latency from message receipt to record (ms); 0: off (fixed MAX_BATCH/MAX_WAIT_MS).
MAX_LATENCY_MS = 0
# `imgpipe watch`: ms to wait after a file event for more files, so that a burst goes out in chunked messages.
WATCH_COALESCE_MS = 5
# `imgpipe watch`: seconds between rescans of the folder for files that landed with no event seen (the kernel's
# event queue overflowed, or a file system that sends none); a reported overflow starts one at once.
WATCH_RESCAN_S = 60
# Most paths one message may carry; a bigger message is refused before any Redis write.
MAX_MESSAGE_PATHS = 4096
# Most characters of paths one message may carry (all its paths together).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Seconds a worker's lease on a message lives without renewal (its heartbeat renews it every 2 s).
LEASE_TTL_S = 15
# Seconds between passes of the reconciler (expired leases and lost messages are sent again).
RECONCILE_S = 2.0
# Seconds a message may stay unleased behind the queue's oldest message before it is taken for lost.
LOST_GRACE_S = 10.0
# Images in decode and inference at once per worker process: one batch per lane (decode thread); the rest wait,
# leased (worker/app.py).
# Seconds a consumer that stopped on an error waits before the worker starts it again.
CONSUMER_RESTART_S = 2.0
# 1: a worker reloads its model when the model file is replaced (IMGPIPE_RELOAD); SIGHUP reloads either way.
RELOAD = 0
# 1: a worker consumes only its model's own queue (jobs pinned to it), not the default queue (IMGPIPE_PINNED_ONLY).
PINNED_ONLY = 0
# Seconds a replaced model file must stay quiet before a watching worker loads it (a copy in progress waits).
RELOAD_SETTLE_S = 1.0

# Seconds a stopping worker waits, beyond the time limit, for the messages in work before leaving them to
# their leases.
DRAIN_MARGIN_S = 5.0
