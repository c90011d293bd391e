#!/usr/bin/env bash
# Run HERE (a host with a package registry), before scripts/gpu-check.sh runs on the lent GPU machine, which
# has PyTorch, torchvision, Pillow, numpy, click, tqdm, prometheus-client and Python 3.12 but no Celery, kombu,
# redis-py or redis-server, and reaches no registry. Fills .gpu-bundle/ (ignored by git, carried with the
# working tree; well under 64 MiB) with:
#   wheels/  the project's own wheel and the wheels of the dependencies the GPU machine lacks
#            (pip download --only-binary=:all: --python-version 3.12, manylinux x86_64)
#   debs/    redis-server and the libraries it needs (apt-get download; unpacked there with dpkg -x)
#   demo/    the demo digits as PNG files (so the check needs no scikit-learn)
# Usage: scripts/gpu-prepare.sh [OUT]   (default .gpu-bundle); PYTHON=... picks the Python with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu-bundle}
PY_VERSION=${PY_VERSION:-3.12}  # the GPU machine's Python; another for a dry run here
PYTHON=${PYTHON:-.venv/bin/python}
# What imgpipe needs beyond what the GPU machine has (pyproject dependencies minus torch, torchvision, pillow,
# numpy, click, tqdm, prometheus-client; matplotlib and scikit-learn only serve train/evaluate/demo-data).
NEEDED=("celery[redis]>=5.3,<6" "redis>=5" "watchdog>=5" "simplejpeg>=1.7" "hiredis>=2")
# Already on the GPU machine: their wheels, pulled in as dependencies, are dropped from the bundle.
PRESENT='^(nvidia_.*|torch|torchvision|pillow|numpy|click|tqdm|prometheus_client|triton|sympy|networkx|jinja2|markupsafe|filelock|fsspec|typing_extensions|mpmath|setuptools)-[0-9]'

rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$OUT/debs"

"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/wheels" .
"$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$OUT/wheels" "${NEEDED[@]}"
for wheel in "$OUT"/wheels/*.whl; do
  name=$(basename "$wheel" | tr 'A-Z' 'a-z')
  if [[ "$name" =~ $PRESENT ]]; then rm -f "$wheel"; fi
done

# redis-server: in Debian the binary is redis-tools' (redis-server is a symlink to it, chosen by argv[0]).
# libssl3, libsystemd0 and libatomic1 are on any recent glibc distribution; jemalloc and lzf usually are not.
(cd "$OUT/debs" && apt-get download redis-server redis-tools libjemalloc2 liblzf1 >/dev/null)

.venv/bin/imgpipe demo-data "$OUT/demo" >/dev/null

du -sh "$OUT" | awk '{print "gpu bundle: " $1 " in '"$OUT"'"}'
ls "$OUT/wheels" "$OUT/debs"
