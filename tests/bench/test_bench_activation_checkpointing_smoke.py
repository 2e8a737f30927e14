"""Quick mode of bench/bench_activation_checkpointing.py (the activation checkpointing figures of docs/performance.md):
it runs every mode in its own process and what it records holds. No timing is asserted; what is: each mode
checkpointed its blocks, and every mode that checkpoints keeps fewer live bytes at the peak than none, full the
fewest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_activation_checkpointing_benchmark_quick_mode(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "bench/bench_activation_checkpointing.py", "--quick"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "bench_activation_checkpointing.json").read_text())
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["none", "full", "every_k_blocks", "selective"]
    assert [rows[mode]["blocks"] for mode in rows] == [0, 4, 2, 4]  # quick mode: 4 layers, every_k 2
    assert all(row["step_s"] > 0 and row["rss_bytes"] > 0 for row in rows.values())
    live = {mode: row["live_bytes"] for mode, row in rows.items()}
    assert live["full"] < live["every_k_blocks"] < live["none"]
    assert live["full"] < live["selective"] < live["none"]
    assert rows["none"]["live_ratio"] == 1.0 and rows["full"]["live_ratio"] < 1.0
    assert "selective" in done.stdout and "x none" in done.stdout
