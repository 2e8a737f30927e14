"""The end-to-end flow on the sample corpus (small settings), under the Prefect test harness: the report and the
artifacts of every stage, from raw files to generated samples."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from flows.end_to_end import end_to_end

pytestmark = pytest.mark.slow


def test_end_to_end_writes_the_report(prefect_api, tmp_path: Path) -> None:
    state = end_to_end(
        out_dir=str(tmp_path),
        vq_steps=10,
        train_steps=4,
        sft_steps=2,
        max_new_tokens=70,
        eval_prompts=1,
        return_state=True,
    )
    assert state.is_completed(), state.message
    result = state.result()
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id, subflows=True)
    keys = {a["key"] for a in artifacts}
    assert {
        "build-dataset-sources",
        "train-loss-curve",
        "sft-final-metrics",
        "generate-text",
        "generate-image",
        "generate-mixed",
        "evaluate-loss",
        "evaluate-prompts",
        "evaluate-captioning",
        "evaluate-vqa",
        "evaluate-benchmarks",
        "evaluate-text-0",
        "end-to-end-training",
    } <= keys

    prepared = {r["source"]: r for r in result["prepared"]}
    assert set(prepared) == {"prose", "code", "photos", "howto", "instructions"}
    assert all(r["records in"] == r["samples out"] + r["rejects"] for r in prepared.values())
    assert [r["run"] for r in result["training"]] == ["pretrain (stage 1, 2)", "sft"]
    assert [r["steps"] for r in result["training"]] == [6, 2]  # stage 1: 4 steps, stage 2: 2 more, one run
    stages = [json.loads(line)["stage"] for line in (tmp_path / "runs" / "pretrain" / "metrics.jsonl").open()]
    assert stages == [0, 0, 0, 0, 1, 1]

    page = (tmp_path / "report.html").read_text()
    for stage in ("stage1", "stage2", "sft"):
        manifest = json.loads((tmp_path / "mixed" / stage / "manifest.json").read_text())
        assert f"{stage}: {manifest['sequences']:,} sequences" in page
    for row in result["training"]:
        assert f"<td>{row['final loss']}</td>" in page
    image = json.loads((tmp_path / "samples" / "image" / "generation.json").read_text())
    assert [s["kind"] for s in image["segments"]] == ["image"]
    pngs = re.findall(r'<img[^>]* src="data:image/png;base64,', page)
    assert len(pngs) >= 3  # shares plot, loss curves, the generated image (and any in the mixed answer)
    text = json.loads((tmp_path / "samples" / "text" / "generation.json").read_text())
    assert html.escape(text["segments"][0]["text"])[:40] in page
    summary = json.loads((tmp_path / "demo-report.json").read_text())
    assert summary["raw"] == {"text": 200, "image_text": 24, "interleaved": 12, "sft": 30}
    assert {k: v["records_in"] for k, v in summary["prepared"].items()} == {
        k: v["records in"] for k, v in prepared.items()
    }
    captioning = json.loads((tmp_path / "eval" / "captioning.json").read_text())
    assert captioning["items"] == 2 and captioning["shots"] == 2  # the bundled sample, scored in the demo
    assert {b["benchmark"]: b["score"] for b in result["benchmarks"]}["captioning"] == round(captioning["cider"], 4)
    assert "<h3>Benchmarks</h3>" in page
    held_out = json.loads((tmp_path / "eval" / "eval-loss.json").read_text())
    assert f"<td>{round(held_out['loss'], 4)}</td>" in page
