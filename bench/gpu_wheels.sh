#!/usr/bin/env bash
# Downloads, HERE (where pip reaches a package index), the wheels the GPU benchmarks need and the lent GPU image
# lacks (pydantic and its dependencies, for CPython 3.12 on manylinux x86_64) into .whl/, which git ignores.
# Then carry `.whl` in the device call; bench/gpu_env.sh installs them there into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# The versions this checkout's venv resolved, so the GPU run imports what the tests here ran against.
versions=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection)==' || true)
[ -n "$versions" ] || versions="pydantic pydantic-core annotated-types typing-inspection"
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $versions
ls -1 .whl
