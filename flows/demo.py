"""`cham demo`: the longest part of the main job that works today, run on the bundled sample corpus.

It grows into the end-to-end flow (sample -> tokenizers -> prepare -> mix -> train -> generate -> eval)
as those capabilities land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipelines.sample_corpus import read_back, write_sample_data


def run_demo(out: Path) -> dict[str, Any]:
    """Write the sample corpus in every raw format under `out/raw`, read it all back, and report counts."""
    out = Path(out)
    started = time.perf_counter()
    manifest = write_sample_data(out / "raw", overwrite=True)
    counts = read_back(out / "raw")
    expected = {kind: manifest[kind]["records"] for kind in ("text", "image_text", "interleaved", "sft")}
    mismatched = {k: (expected[k], counts[k]) for k in expected if expected[k] != counts[k]}
    if mismatched:
        raise RuntimeError(f"read back a different number of records than written: {mismatched}")
    report = {
        "out": str(out),
        "written": expected,
        "images_decoded": counts["images_decoded"],
        "faces": manifest["faces"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "demo-report.json").write_text(json.dumps(report, indent=2))
    return report
