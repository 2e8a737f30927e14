#!/usr/bin/env bash
# Train-step tokens/s and MFU of a ~1B Chameleon config on one H100 (bf16 autocast, each block torch.compile'd):
# runs bench/gpu_train.py and, when $OUT is set, leaves the figures in $OUT/gpu_train.json.
#
# Python, in order of preference (nothing is created outside the repository):
#   1. .venv/bin/python if it was carried and its torch sees CUDA;
#   2. a system python3 whose torch sees CUDA (the GPU image usually has one), with torch, pydantic and PyYAML;
#   3. otherwise a venv at .venv-gpu inside the repo, with `pip install torch pydantic pyyaml` (pip's default
#      torch wheel on Linux x86_64 is the CUDA build). This needs network access; the lent GPU machines have none,
#      so there it fails with a message instead of hanging.
# The project's .venv here is CPU-only torch, so carrying it alone is not enough on a GPU machine.
#
# Usage: bash bench/gpu_train.sh [gpu_train.py args], e.g. --seq 2048 --batch 8. Whole run is capped at 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

has_cuda_torch() {
    "$1" -c 'import sys, torch, pydantic, yaml; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

if [ -x .venv/bin/python ] && has_cuda_torch .venv/bin/python; then
    PY=.venv/bin/python
elif command -v python3 >/dev/null && has_cuda_torch python3; then
    PY=python3
elif [ -x .venv-gpu/bin/python ] && has_cuda_torch .venv-gpu/bin/python; then
    PY=.venv-gpu/bin/python
else
    echo "no Python with CUDA torch found; creating .venv-gpu (needs network)" >&2
    python3 -m venv .venv-gpu
    timeout 240 .venv-gpu/bin/pip install --quiet torch pydantic pyyaml || {
        echo "pip install failed (no network?): carry a CUDA-enabled venv instead" >&2
        exit 1
    }
    PY=.venv-gpu/bin/python
fi

echo "python: $PY ($("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# The repo root on sys.path (imports `model`, `schemas`) without installing the package.
# gpu_train.py bounds warm-up and the timed loop itself; timeout is the backstop if compilation stalls.
# Defaults: seq 4096, batch 4 (halved on OOM), 60 s of timed steps.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$PY" bench/gpu_train.py "$@"
