"""Quick modes of the generation, image-preprocessing, text-encode and VQ-encode benchmarks: the scripts behind
docs/performance.md must run.

Figures are not asserted (no timing in tests); what is asserted is what the benchmarks check about themselves:
the two models are the same function, every run made the tokens it was asked for, the fast image path stays
within 40 dB of the exact one, our text ids are SentencePiece's shifted into Chameleon's id space, and both VQ
memory layouts give the same codes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_generation_benchmark_quick_mode(tmp_path: Path):
    _run(["bench/bench_generate.py", "--quick", "--repeats", "1", "--image-repeats", "1"], tmp_path)
    result = json.loads((tmp_path / "bench_generate.json").read_text())
    rows = result["rows"]
    assert {(r["what"], r["batch"]) for r in rows} == {("text", 1), ("text", 4), ("image", 1), ("image", 4)}
    for row in rows:
        assert row["max_logit_diff"] < 1e-4  # the same weights in both models
        assert row["ours"] > 0 and row["hf"] > 0 and row["ratio"] > 0
        if row["what"] == "text":  # greedy on both sides: the same ids, and ours ran the full length
            assert "ours full length: True" in row["check"]
            assert re.search(r"equal to HF's in (\d+)/\1 rows", row["check"]), row["check"]
        else:
            assert "+ EOI per row: True" in row["check"] and "HF only codes: True" in row["check"]


@pytest.mark.slow
def test_image_preprocess_benchmark_quick_mode(tmp_path: Path):
    out = _run(["bench/bench_image_preprocess.py", "--quick"], tmp_path)
    line = re.compile(r"^(fast \(draft \+ libvips\)|fast with Pillow Lanczos)\s+[\d.]+\s+[\d.]+\s+([\d.]+) / ([\d.]+)$")
    rows = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in map(line.match, out.splitlines()) if m}
    assert set(rows) == {"fast (draft + libvips)", "fast with Pillow Lanczos"}, out
    for mean, worst in rows.values():
        assert worst >= 40 and mean >= worst
    assert "fast / exact:" in out


@pytest.mark.slow
def test_text_encode_benchmark_quick_mode(tmp_path: Path):
    out = _run(["bench/bench_text_encode.py", "--quick"], tmp_path)
    rows = re.findall(r"^\s+([12])\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["1", "2"], out
    assert all(float(sp) > 0 and float(ours) > 0 for _, sp, ours, _ in rows)
    same = re.search(r"round trip exact, in (\d+)/(\d+) documents", out)
    assert same and same.group(1) == same.group(2) and int(same.group(2)) > 100, out


@pytest.mark.slow
def test_vq_encode_benchmark_quick_mode(tmp_path: Path):
    out = _run(["bench/bench_vq_encode.py", "--quick", "--threads", "2"], tmp_path)
    rows = re.findall(r"^\s*(\w+)\s+(\d+)px\s+batch\s+(\d+):.*codes agree ([\d.]+)%$", out, re.MULTILINE)
    assert [(p, int(b)) for p, _, b, _ in rows] == [("tiny", 1), ("tiny", 16), ("chameleon", 1)], out
    assert all(float(agree) >= 99.0 for *_, agree in rows), out
    assert "geometric mean" in out
