"""The GPU correctness checks' CPU smoke mode: the script a lent GPU machine runs first must work when it gets there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_checks_cpu_smoke_passes_and_reports(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "bench/gpu_checks.py", "--cpu-smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_checks.json").read_text())
    flex, graph, loss = report["flex_attention"], report["graph_decoding"], report["fused_loss"]
    assert flex["passed"] and not flex["backward"] and flex["fp32"]["max_relative_diff"] < 1e-3
    assert all(flex[v]["max_relative_diff"] < flex[v]["tolerance"] for v in ("bf16", "bf16_compiled"))
    assert loss["passed"] and loss["fp32"]["max_relative_diff"] < 1e-4 and loss["bf16"]["max_relative_diff"] < 3e-2
    # Mixed mode must start images, or the check would not cover the image steps.
    assert graph["passed"] and graph["text"]["equal"] and graph["mixed"]["equal"] and graph["mixed"]["images"] > 0
    assert graph["graphed"] is False  # no graph on CPU: the fixed-shape step ran eagerly
