#!/usr/bin/env bash
# Both GPU benchmarks in one device call, sized for a 15-minute device budget (machine start included): the train
# step (bench/gpu_train.py, causal then packed documents with FlexAttention, capped at 4 minutes; the causal figures
# are written first, so a cut run keeps them) then generation (bench/bench_generate.py --device cuda --cfg batch1,
# capped at 4.5 minutes). Figures go to $OUT/gpu_train.json and $OUT/gpu_generate.json; one failing does not stop
# the other. Python and imports as bench/gpu_env.sh says:
#   bash bench/gpu_wheels.sh      # here
#   run: command "bash bench/gpu_all.sh", carry [".whl"], timeout_s 570
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh || exit 1
status=0
echo "== train step =="
timeout -k 15 240 "$PY" bench/gpu_train.py --seconds 30 --documents --doc-seconds 20 || { echo "gpu_train.py failed ($?)"; status=1; }
echo "== generation =="
json=()
[ -n "${OUT:-}" ] && json=(--json "$OUT/gpu_generate.json")
timeout -k 15 270 "$PY" bench/bench_generate.py --device cuda --cfg batch1 ${json[@]+"${json[@]}"} || {
    echo "bench_generate.py failed ($?)"
    status=1
}
exit $status
