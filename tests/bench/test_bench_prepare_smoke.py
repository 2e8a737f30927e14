"""The prepare benchmarks' quick modes run (no timing asserted): bench_prepare's runners and stage shares, and
bench_prepare_scaling's 1 and 2 workers on the local runner and on a Dask cluster of separate processes, whose
runs must all write the same shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_prepare_benchmark_quick_mode() -> None:
    out = _run(["bench/bench_prepare.py", "--quick"])
    assert "48 image-text pairs" in out and "scaling, local 2 workers / 1:" in out
    assert "stage times per image, VQ preset tiny" in out


@pytest.mark.slow
def test_prepare_scaling_benchmark_quick_mode(tmp_path: Path) -> None:
    report = tmp_path / "scaling.json"
    out = _run(["bench/bench_prepare_scaling.py", "--quick", "--json", str(report)])
    assert "every run wrote the same shards, byte for byte" in out
    figures = json.loads(report.read_text())
    assert figures["pairs"] == 48 and set(figures["runners"]) == {"local", "dask"}
    for result in figures["runners"].values():
        assert set(result["best"]) == {"1", "2"} and all(s > 0 for s in result["best"].values())
        assert result["ratio"] > 0
