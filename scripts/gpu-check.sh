#!/usr/bin/env bash
# Run ON the GPU machine (after scripts/gpu-prepare.sh filled .gpu-bundle/ here and it travelled with the tree):
# installs the bundle with --no-index into a scratch folder (nothing is installed system-wide), then prints the
# `imgpipe bench` table on the GPU: the in-process engine (AMP fp16, channels_last, pinned memory, decode threads
# sized to the cores), the DataLoader peer, the model's compute ceiling on pre-decoded tensors and the decode
# ceiling (which one bounds the pipeline, and how close the engine gets), and real `imgpipe worker`s fed
# through a scratch Redis (pipeline, stream); before it, a table of the engine's inference settings (TorchScript
# executor, AMP, channels_last) and decode threads (scripts/gpu_configs.py). Bounded to under 8 minutes.
# Usage: scripts/gpu-check.sh [--cpu] [OUT_DIR]   --cpu: the same run on the CPU (a dry run where there is no GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--cpu" ]; then DEVICE=cpu; shift; fi
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

echo "== inference settings and decode threads on $DEVICE (scripts/gpu_configs.py)"
timeout 200 "$PYTHON" -P scripts/gpu_configs.py "$BUNDLE/demo" --device "$DEVICE" --budget 1.0 \
  --json "$OUT/configs-$DEVICE.json" 2>&1 | tee "$OUT/configs-$DEVICE.txt" || echo "gpu-check: settings table failed or timed out"

echo "== bench on $DEVICE (limit ${LIMIT_S}s)"
# One run: both workloads, the engine and its two ceilings, the peer, and real workers through a scratch Redis.
timeout "$LIMIT_S" "$PYTHON" -P -m imgpipe bench "$BUNDLE/demo" --device "$DEVICE" \
  --variants inprocess,dataloader,compute,decode,pipeline,stream \
  --images "$DIGITS" --photos "$PHOTOS" --rounds "$ROUNDS" --json "$OUT/bench-$DEVICE.json" \
  2> >(tee "$OUT/bench-$DEVICE.progress" >&2) | tee "$OUT/bench-$DEVICE.txt"
echo "== done: $OUT/bench-$DEVICE.json"
