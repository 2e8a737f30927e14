#!/usr/bin/env bash
# Generation on the GPU, ours vs Hugging Face `generate` (bench/bench_generate.py --device cuda); leaves the figures
# in $OUT/gpu_generate.json when $OUT is set. Python and imports as bench/gpu_env.sh says (carry .whl).
#   run: command "bash bench/gpu_generate.sh --cfg batch1", carry [".whl"], timeout_s 480
# Extra arguments go to bench_generate.py (e.g. --only tiny, --dtype bf16). Capped at 7 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
json=()
[ -n "${OUT:-}" ] && json=(--json "$OUT/gpu_generate.json")
timeout -k 15 420 "$PY" bench/bench_generate.py --device cuda ${json[@]+"${json[@]}"} "$@"
