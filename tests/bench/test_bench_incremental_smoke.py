"""The incremental-prepare benchmark's small mode runs (no timing asserted): the second build writes the new file's
shard only and reuses every earlier one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_incremental_prepare_benchmark_small(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["bench/bench_incremental_prepare.py", "--files", "10", "--docs", "20", "--new-share", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, *args, "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert (report["full_shards"], report["full_records"]) == (10, 200)
    assert (report["new_files"], report["new_shards"], report["reused_shards"]) == (1, 1, 10)
    assert report["ratio"] > 0 and "incremental / full build time:" in done.stdout
