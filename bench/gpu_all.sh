#!/usr/bin/env bash
# All GPU work in one device call, sized for a 15-minute device budget (machine start included):
#   1. bench/gpu_checks.py: the CUDA code paths are right (fused loss, CUDA-graph decoding, FlexAttention gradients in
#      fp32, bf16 and bf16 with compiled blocks), capped at 150 s (written after each check);
#   2. bench/gpu_train.py: train-step tokens/s and MFU, causal then packed documents with FlexAttention, capped at
#      200 s (the causal figures are written first, so a cut run keeps them);
#   3. bench/bench_generate.py --device cuda --cfg batch1: generation vs HF, capped at 200 s (written per config).
# 550 s of caps, 15 s of kill grace and the wheels' install fit the call's 590 s.
# Figures go to $OUT/gpu_checks.json, gpu_train.json and gpu_generate.json; one failing does not stop the others.
# Python and imports as bench/gpu_env.sh says:
#   bash bench/gpu_wheels.sh      # here
#   run: command "bash bench/gpu_all.sh", carry [".whl"], timeout_s 590
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh || exit 1
status=0
echo "== checks =="
timeout -k 5 150 "$PY" bench/gpu_checks.py || { echo "gpu_checks.py failed ($?)"; status=1; }
echo "== train step =="
timeout -k 5 200 "$PY" bench/gpu_train.py --seconds 25 --documents --doc-seconds 15 || {
    echo "gpu_train.py failed ($?)"
    status=1
}
echo "== generation =="
json=()
[ -n "${OUT:-}" ] && json=(--json "$OUT/gpu_generate.json")
timeout -k 5 200 "$PY" bench/bench_generate.py --device cuda --cfg batch1 ${json[@]+"${json[@]}"} || {
    echo "bench_generate.py failed ($?)"
    status=1
}
exit $status
