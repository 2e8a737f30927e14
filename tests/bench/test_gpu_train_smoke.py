"""The GPU train benchmark's CPU smoke mode: the script a lent GPU machine runs must not rot between lendings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--documents"], ["--logits-path"]])
def test_gpu_train_cpu_smoke_writes_its_figures(tmp_path: Path, extra: list[str]):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "bench/gpu_train.py", "--cpu-smoke", "--no-compile", "--seconds", "1", *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_train.json").read_text())
    assert result["device"] == "cpu (smoke)" and result["timed_steps"] >= 1
    assert result["tokens_per_step"] == 2 * 128 and result["tokens_per_s"] > 0
    assert ("fused" in result["loss_path"]) == (extra != ["--logits-path"])
    # The tiny model's loss at init is about ln(vocab) = ln(2,048) = 7.6, plus a little z-loss on the fused path.
    assert 6.5 < result["last_loss"] < 9.0
    if extra == ["--documents"]:  # packed documents, masked with SDPA's dense mask on CPU
        docs = result["documents"]
        assert docs["attention"] == "sdpa" and docs["timed_steps"] >= 1 and docs["documents_per_sequence"] > 2
        assert docs["tokens_per_s"] > 0 and 0 < docs["last_loss"] < 9.0  # the same batch again: loss may fall
    else:
        assert "documents" not in result
