"""Quick mode of bench/bench_checkpoint.py (the checkpoint figures of docs/performance.md): every variant runs on its
2 gloo ranks and what it records holds. No timing is asserted; what is: the sharded folders (sync and async) hold
one .distcp per rank and no model.pt, the gathered one a model.pt and the optimizer in trainer.pt; both loads give
every rank the model and optimizer shards that were saved, bit for bit; each variant's memory was measured on
every rank."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ["gathered_save", "sharded_save", "async_save", "gathered_load", "sharded_load"]


@pytest.mark.slow
def test_checkpoint_benchmark_quick_mode(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "bench/bench_checkpoint.py", "--quick", "--dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench_checkpoint.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the checkpoints were removed

    files = result["files"]
    assert set(files["gathered"]) == {"model.pt", "trainer.pt", "state.json"}
    for name in ("sharded", "async"):
        distcp = sorted(f for f in files[name] if f.endswith(".distcp"))
        assert distcp == ["sharded/__0_0.distcp", "sharded/__1_0.distcp"], files[name]  # one per rank
        assert "sharded/.metadata" in files[name] and "state.json" in files[name] and "model.pt" not in files[name]
    # The sharded trainer.pt holds no optimizer: it is the gathered one's small part.
    assert files["sharded"]["trainer.pt"] * 10 < files["gathered"]["trainer.pt"]

    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == VARIANTS
    for rank in range(2):
        digests = {variant: rows[variant]["ranks"][rank]["digests"] for variant in VARIANTS}
        # Every save started from the same state, and both loads (into another seed's model, no optimizer state)
        # ended at it: one digest for all.
        assert all(len(d) == 1 for d in digests.values()), digests
        assert len({d[0] for d in digests.values()}) == 1, digests
    assert rows["gathered_save"]["ranks"][0]["digests"] != rows["gathered_save"]["ranks"][1]["digests"]  # own shards
    for row in rows.values():
        assert row["seconds"] > 0
        for rank in row["ranks"]:
            assert rank["peak"] >= rank["rss_before"] > 0 and rank["state_bytes"] > 0
            assert rank["peak_since_reset"]  # /proc/self/clear_refs took: the peak is the operation's
    assert rows["async_save"]["blocked_s"] > 0 and rows["async_save"]["whole_s"] > 0
    assert len(result["ratios"]) == 10 and all(math.isfinite(v) and v >= 0 for v in result["ratios"].values())
    assert "load_s sharded/gathered" in done.stdout and "async_save" in done.stdout
