"""The dedup benchmark's quick mode runs (no timing asserted): our MinHash stage finds every planted duplicate pair
of its corpus (paraphrases with 3 words changed, exact copies) and flags no other pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dedup_benchmark_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "bench_dedup.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # datatrove is not a dependency: ours runs alone here
    args = [sys.executable, "bench/bench_dedup.py", "--quick", "--json", str(out)]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert (report["docs"], report["permutations"]) == (200, 112)
    assert report["planted_found"] == report["planted_pairs"] == 30 and report["other_pairs_flagged"] == 0
    assert report["ours_s"] > 0 and ("datatrove_s" in report or report["datatrove"].startswith("not importable"))
    assert "planted duplicate pairs found: 30 of 30" in done.stdout
