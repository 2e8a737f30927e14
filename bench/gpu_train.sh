#!/usr/bin/env bash
# Train-step tokens/s and MFU of a ~1B Chameleon config on one H100 (bf16 autocast, each block torch.compile'd):
# runs bench/gpu_train.py and, when $OUT is set, leaves the figures in $OUT/gpu_train.json.
#
# Python and imports: bench/gpu_env.sh (the image's CUDA torch; pydantic from carried wheels, see
# bench/gpu_wheels.sh). One device call, wheels made here first:
#   bash bench/gpu_wheels.sh      # here
#   run: command "bash bench/gpu_train.sh", carry [".whl"], timeout_s 420
#
# Usage: bash bench/gpu_train.sh [gpu_train.py args], e.g. --seq 2048 --batch 8. Whole run is capped at 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh

# gpu_train.py bounds warm-up and the timed loop itself; timeout is the backstop if compilation stalls.
# Defaults: seq 4096, batch 4 (halved on OOM), 60 s of timed steps.
timeout -k 15 300 "$PY" bench/gpu_train.py "$@"
