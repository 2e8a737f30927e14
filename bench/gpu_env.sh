# Sourced by bench/gpu_*.sh: picks a Python whose torch sees CUDA and makes the project's few non-torch imports
# (pydantic, PyYAML) available to it, without network. Sets PY and exports PYTHONPATH (repo root first).
#
# Python, in order: .venv/bin/python if its torch sees CUDA; else the image's python3 (the lent GPU machines have
# torch with CUDA there, but no pydantic). Missing packages come from wheels carried in .whl/ (made here, where pip
# works, by bench/gpu_wheels.sh; name .whl in the device call's `carry`), installed into /tmp/site.

has_cuda_torch() {
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

if [ -x .venv/bin/python ] && has_cuda_torch .venv/bin/python; then
    PY=.venv/bin/python
elif command -v python3 >/dev/null && has_cuda_torch python3; then
    PY=python3
else
    echo "no Python with CUDA torch found (the project's .venv is CPU-only torch)" >&2
    exit 1
fi

if ! "$PY" -c 'import pydantic, yaml' 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "$PY lacks pydantic / PyYAML and no .whl/ was carried: run bench/gpu_wheels.sh here first" >&2
        exit 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "python: $PY ($("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
