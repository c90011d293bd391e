# imgpipe image: `imgpipe worker`, `imgpipe exporter` and the producer commands (enqueue, watch, status, results).
#   docker build -t imgpipe .
# PyTorch comes from the default package index (CUDA-enabled wheels on Linux x86-64). For a smaller CPU-only
# image, pass a CPU wheel index: docker build --build-arg PIP_EXTRA_INDEX_URL=<index> -t imgpipe .
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

WORKDIR /app
# Dependencies first, so that a code change does not reinstall PyTorch. nvidia-ml-py (NVML bindings) feeds the
# GPU memory and utilisation gauges on /metrics; it does nothing on CPU hosts.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt nvidia-ml-py

COPY imgpipe ./imgpipe
COPY model ./model
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-deps . && useradd --create-home --uid 10001 imgpipe

USER imgpipe
# 9400: a worker's /metrics (--metrics-port); 9808: the exporter's /metrics.
EXPOSE 9400 9808
ENTRYPOINT ["imgpipe"]
CMD ["worker", "--metrics-port", "9400"]
