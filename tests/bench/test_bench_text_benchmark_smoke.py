"""bench/bench_text_benchmark.py on a tiny model and task: it runs ours and lm-evaluation-harness on the same export
and records both; the scores agree. No timing is asserted. Without .venv-lmeval (outside CI) ours runs alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HAS_LM_EVAL = (REPO / ".venv-lmeval" / "bin" / "python").exists() or bool(os.environ.get("CI"))


@pytest.mark.slow
def test_text_benchmark_bench_runs_both_sides_and_they_agree(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "bench/bench_text_benchmark.py", "--preset", "tiny", "--questions", "6"]
    command += ["--shots", "1", "--batch", "2", "--threads", "1", "--max-seq-len", "512"]
    if not HAS_LM_EVAL:
        command.append("--no-lm-eval")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench_text_benchmark.json").read_text())
    assert result["requests"] == 6 * 4 and result["ours_s"] > 0 and result["tokens_per_request"] > 10
    assert set(result["ours_metrics"]) >= {"acc", "acc_norm", "acc_bytes"}
    assert "requests/s" in done.stdout
    if HAS_LM_EVAL:
        assert result["same_scores"] is True and result["max_abs_loglikelihood_diff"] < 1e-3
        assert result["lm_eval_s"] > 0 and result["speedup"] > 0 and "speedup" in done.stdout
