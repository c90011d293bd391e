#!/usr/bin/env bash
# One command from a fresh clone to labels: venv, install, the offline demo images, then classify them
# in-process with the bundled CNN (no Redis needed). Records land in demo/labels.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[worker]'

[ -d demo/val ] || .venv/bin/imgpipe demo-data demo
.venv/bin/imgpipe classify demo/val -o demo/labels.jsonl "$@"
echo "first records:" >&2
head -n 3 demo/labels.jsonl >&2
