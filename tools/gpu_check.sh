#!/usr/bin/env bash
# The GPU check: BCCD training with AMP (s/iter, test mAP) and R50-FPN inference / training
# for detkit and torchvision side by side, written to one JSON (work_dirs/gpu_check_<time>/
# gpu_check.json); a few minutes on one modern GPU (budget: 8). See tools/gpu_check.py.
#
#   bash tools/gpu_check.sh [--out DIR] [--iters N]         # PYTHON=... to choose the interpreter
#
# Without a CUDA GPU it stops at once with one line and exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" tools/gpu_check.py "$@"
