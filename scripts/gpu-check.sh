#!/usr/bin/env bash
# Run ON the GPU machine (after scripts/gpu-prepare.sh filled .gpu-bundle/ here and it travelled with the tree):
# installs the bundle with --no-index into a scratch folder (nothing is installed system-wide), then prints the
# `imgpipe bench` table on the GPU: the in-process engine (AMP fp16, channels_last, pinned memory, decode threads
# sized to the cores), the DataLoader peer, the model's compute ceiling on pre-decoded tensors and the decode
# ceiling (which one bounds the pipeline, and how close the engine gets), and real `imgpipe worker`s fed
# through a scratch Redis (pipeline, stream); before it, a table of the engine's inference settings (TorchScript
# executor, AMP, channels_last) and decode threads (scripts/gpu_configs.py). Bounded to under 8 minutes.
# --scaling instead runs what a deployment sizes on the GPU: the digits' in-process rate by the engine's decode
# threads (IMGPIPE_DECODE_THREADS), and the photos through real workers by worker processes sharing the one GPU
# (--concurrency), and the model alone in 1, 2 and 4 processes sharing the device (scripts/gpu_processes.py): how
# much more processes lift a decode-bound pipeline, and what sharing one GPU among CUDA contexts costs. About 6
# minutes; SCALING_THREADS, SCALING_PROCESSES, SCALING_MODEL_PROCESSES pick the counts ("" skips a part).
# Usage: scripts/gpu-check.sh [--cpu] [--scaling] [OUT_DIR]   --cpu: the same run on the CPU (a dry run where
# there is no GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
SCALING=
while [ "${1:-}" = "--cpu" ] || [ "${1:-}" = "--scaling" ]; do
  if [ "$1" = "--cpu" ]; then DEVICE=cpu; else SCALING=1; fi
  shift
done
OUT=${1:-${OUT:-gpu-check-out}}
BUNDLE=${BUNDLE:-.gpu-bundle}
PYTHON=${PYTHON:-python3}
# Sizes: fixed, so runs compare; the settings table (at most 200 s) and the bench (at most LIMIT_S) fit 8 minutes.
DIGITS=${DIGITS:-2000}
PHOTOS=${PHOTOS:-400}
ROUNDS=${ROUNDS:-3}
LIMIT_S=${LIMIT_S:-270}

[ -d "$BUNDLE/wheels" ] || { echo "gpu-check: no $BUNDLE/wheels: run scripts/gpu-prepare.sh first" >&2; exit 2; }
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/imgpipe-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "== machine"
"$PYTHON" - <<'PY'
import os, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, gpu {gpu}, "
      f"{os.cpu_count()} cpus")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

echo "== install (no index) into $WORK"
"$PYTHON" -m pip install -q --no-index --no-deps --target "$WORK/site" "$BUNDLE"/wheels/*.whl
if ! command -v redis-server >/dev/null; then
  for deb in "$BUNDLE"/debs/*.deb; do dpkg -x "$deb" "$WORK/redis"; done
  mkdir -p "$WORK/bin"
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
    "$WORK/redis/usr/lib/x86_64-linux-gnu" "$WORK/redis/usr/bin/redis-server" > "$WORK/bin/redis-server"
  chmod +x "$WORK/bin/redis-server"
  export PATH="$WORK/bin:$PATH"
fi
redis-server --version
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -P -c "import imgpipe.model.preprocess as p, celery, redis; print('imgpipe ok; jpeg decoder', p.JPEG_DECODER)"

if [ -n "$SCALING" ]; then
  if [ -n "${SCALING_MODEL_PROCESSES-1,2,4}" ]; then
    echo "== the model alone in processes sharing $DEVICE (scripts/gpu_processes.py)"
    timeout 150 "$PYTHON" -P scripts/gpu_processes.py --device "$DEVICE" --processes "${SCALING_MODEL_PROCESSES-1,2,4}" \
      --json "$OUT/scaling-model-processes.json" || echo "gpu-check: failed or timed out"
  fi
  for threads in ${SCALING_THREADS-2 4 8 16}; do
    echo "== digits in-process on $DEVICE, IMGPIPE_DECODE_THREADS=$threads"
    IMGPIPE_DECODE_THREADS=$threads timeout 60 "$PYTHON" -P -m imgpipe bench "$BUNDLE/demo" --device "$DEVICE" \
      --workload digits --variants inprocess,decode,dataloader --images "$DIGITS" --rounds 2 \
      --json "$OUT/scaling-digits-threads$threads.json" 2>/dev/null | grep -v '^{' || echo "gpu-check: failed or timed out"
  done
  for processes in ${SCALING_PROCESSES-1 2 4}; do
    echo "== photos through a worker on $DEVICE, --concurrency $processes"
    timeout 90 "$PYTHON" -P -m imgpipe bench --device "$DEVICE" --workload photos --variants inprocess,pipeline \
      --concurrency "$processes" --photos "$PHOTOS" --rounds 2 --logs "$OUT/logs-photos-processes$processes" \
      --json "$OUT/scaling-photos-processes$processes.json" 2>/dev/null | grep -v '^{' || echo "gpu-check: failed or timed out"
  done
  echo "== done: $OUT/scaling-*.json"
  exit 0
fi

echo "== inference settings and decode threads on $DEVICE (scripts/gpu_configs.py)"
timeout 200 "$PYTHON" -P scripts/gpu_configs.py "$BUNDLE/demo" --device "$DEVICE" --budget 1.0 \
  --json "$OUT/configs-$DEVICE.json" 2>&1 | tee "$OUT/configs-$DEVICE.txt" || echo "gpu-check: settings table failed or timed out"

echo "== bench on $DEVICE (limit ${LIMIT_S}s)"
# One run: both workloads, the engine and its two ceilings, the peer, and real workers through a scratch Redis.
timeout "$LIMIT_S" "$PYTHON" -P -m imgpipe bench "$BUNDLE/demo" --device "$DEVICE" \
  --variants inprocess,dataloader,compute,decode,pipeline,stream \
  --images "$DIGITS" --photos "$PHOTOS" --rounds "$ROUNDS" --json "$OUT/bench-$DEVICE.json" --logs "$OUT/logs" \
  2> >(tee "$OUT/bench-$DEVICE.progress" >&2) | tee "$OUT/bench-$DEVICE.txt"
echo "== done: $OUT/bench-$DEVICE.json"
