"""The image-download benchmark behind docs/performance.md runs: every row fetched every image, each cold run sent
one request per image, and the warm-cache row sent none. Figures are not asserted (no timing in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_image_download_benchmark_quick_mode(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "bench/bench_image_download.py", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "bench_image_download.json").read_text())
    rows = result["rows"]
    assert [r["ok"] for r in rows] == [result["images"]] * 4
    assert [r["requests"] for r in rows] == [result["images"]] * 3 + [0]
    assert [(r["concurrency"], r["per_host"]) for r in rows] == [(1, 1), (16, 16), (16, 4), (16, 16)]
    assert set(result["ratios"]) == {rows[1]["what"], rows[2]["what"]} and "/ sequential:" in done.stdout
