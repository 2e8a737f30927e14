"""Quick mode of bench/bench_cli_startup.py (the `cham` startup figures of docs/performance.md): it runs, and what it
records about each command holds. No timing is asserted; what is: each command answered as it should (help, a
missing file, no server) and imported none of torch, Beam, transformers (and Prefect only for `cham serve`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cli_startup_benchmark_quick_mode(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "bench/bench_cli_startup.py", "--quick"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "bench_cli_startup.json").read_text())
    rows = {row["command"]: row["this"] for row in result["rows"]}
    names = ["cham --help", "cham prepare --help", "cham train missing.yaml", "cham serve (no server)"]
    assert list(rows) == ["python -c pass", "prefect --help", *names]
    assert all(row["median_s"] > 0 and len(row["times_s"]) == 1 for row in rows.values())
    assert rows["prefect --help"]["heavy"] == ["prefect"]
    for name in ("cham --help", "cham prepare --help"):
        assert (rows[name]["exit"], rows[name]["heavy"]) == (0, [])
    missing = rows["cham train missing.yaml"]
    assert (missing["exit"], missing["heavy"], missing["last_line"]) == (1, [], "error: missing.yaml: file not found")
    serve = rows["cham serve (no server)"]
    assert serve["exit"] == 1 and serve["heavy"] == ["prefect"]
    assert serve["last_line"].startswith("error: no Prefect server answers at http://127.0.0.1:")
    assert "cham train missing.yaml (this): error: missing.yaml: file not found" in done.stdout
