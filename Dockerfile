# syntax=docker/dockerfile:1
# Two images from one file (docs/deploy.md):
#   docker build --target worker -t localhost/imgpipe-worker:0.1.0 .   # `imgpipe worker`: CUDA PyTorch base, GPU hosts
#   docker build --target app    -t localhost/imgpipe:0.1.0 .          # enqueue/watch/status/results/exporter: no torch
# Both run as the unprivileged user 10001 and work with a read-only root filesystem (a writable /tmp is enough).
# Base images are pinned by tag and registry-qualified; pin them by digest (@sha256:...) in your own registry.
ARG PYTHON_IMAGE=docker.io/library/python:3.11.10-slim-bookworm
ARG PYTORCH_IMAGE=docker.io/pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# --- build: the imgpipe wheel (pure Python, so one wheel serves both images) ---------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY imgpipe ./imgpipe
COPY model ./model
COPY producer ./producer
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- app: producer commands and the exporter, without torch (a few hundred MB instead of several GB) -------------
FROM ${PYTHON_IMAGE} AS app
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
COPY --from=build /wheels /wheels
# The base install (no extras): celery, redis, prometheus-client, click, tqdm, watchdog. The wheel is named by
# its file, so that no package index can substitute another "imgpipe".
RUN pip install --no-cache-dir /wheels/imgpipe-*.whl \
    && rm -rf /wheels \
    && useradd --no-create-home --uid 10001 --shell /usr/sbin/nologin imgpipe
USER 10001
WORKDIR /tmp
# 9808: the exporter's /metrics.
EXPOSE 9808
ENTRYPOINT ["imgpipe"]
CMD ["status"]

# --- worker: `imgpipe worker` on the CUDA PyTorch base (torch and torchvision come with it) ----------------------
FROM ${PYTORCH_IMAGE} AS worker
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    IMGPIPE_HEALTH_DIR=/tmp/imgpipe-health
COPY --from=build /wheels /wheels
# The `worker` extra; the base image's torch and torchvision satisfy it, so pip keeps them. nvidia-ml-py (NVML)
# feeds the GPU memory and utilisation gauges on /metrics.
RUN pip install --no-cache-dir "$(echo /wheels/imgpipe-*.whl)[worker]" "nvidia-ml-py==12.560.30" \
    && rm -rf /wheels \
    && useradd --no-create-home --uid 10001 --shell /usr/sbin/nologin imgpipe
USER 10001
WORKDIR /tmp
# 9400: the worker's /metrics (--metrics-port).
EXPOSE 9400
# Readiness: live, connected to Redis and making progress (or idle). Orchestrators that restart on failure should
# probe liveness instead (`imgpipe worker --check --liveness`), so that a Redis outage does not restart workers.
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 CMD ["imgpipe", "worker", "--check"]
ENTRYPOINT ["imgpipe"]
CMD ["worker", "--metrics-port", "9400"]
