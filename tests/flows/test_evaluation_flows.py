"""The generate and evaluate flows under the Prefect test harness, on a tiny pretrained run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.evaluation_flows import evaluate, generate

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_generate_flow_shows_text_and_images(prefect_api, tiny_run: Path, tmp_path: Path) -> None:
    text = generate(checkpoint=str(tiny_run), prompt="The function", out_dir=str(tmp_path / "text"), mode="text",
                    max_new_tokens=16, seed=3, return_state=True)  # fmt: skip
    assert text.is_completed(), text.message
    record = json.loads((tmp_path / "text" / "generation.json").read_text())
    words = "".join(s["text"] for s in record["segments"])
    assert text.result()["text"] == words and words.strip()
    shown = prefect_api.by_key(prefect_api.artifacts(text.state_details.flow_run_id), "generate-text")["data"]
    assert "**Prompt:** The function" in shown and f"{record['new_tokens']} new tokens" in shown
    assert words.strip().splitlines()[0] in shown and "data:image/png" not in shown

    photo = sorted((REPO / "sample" / "images").glob("*.jpg"))[0]
    image = generate(checkpoint=str(tiny_run), prompt="A photo like this", out_dir=str(tmp_path / "image"),
                     mode="image", images=[str(photo)], return_state=True)  # fmt: skip
    assert image.is_completed(), image.message
    (png,) = image.result()["images"]
    shown = prefect_api.by_key(prefect_api.artifacts(image.state_details.flow_run_id), "generate-image")["data"]
    from flows.artifacts import png_data_uri

    assert shown.count("data:image/png;base64,") == 1 and png_data_uri(Path(png)) in shown


def test_evaluate_flow_reports_heldout_loss_and_responses(prefect_api, tiny_run: Path, make_stage, tmp_path) -> None:
    heldout = make_stage(3_000, prose_weight=2.0)
    prompts = tmp_path / "prompts.jsonl"
    lines = (REPO / "sample" / "eval" / "prompts.jsonl").read_text().splitlines()[:2]
    prompts.write_text("\n".join(lines) + "\n")
    state = evaluate(checkpoint=str(tiny_run), out_dir=str(tmp_path / "eval"), stage=str(heldout),
                     prompts=str(prompts), max_batches=2, mode="text", max_new_tokens=8, return_state=True)  # fmt: skip
    assert state.is_completed(), state.message
    result = json.loads((tmp_path / "eval" / "eval-loss.json").read_text())
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    rows = {r["scope"]: r for r in prefect_api.by_key(artifacts, "evaluate-loss")["data"]}
    assert rows["all"]["loss"] == pytest.approx(result["loss"], abs=1e-4) and rows["all"]["tokens"] == result["tokens"]
    assert {"source: prose", "source: photos"} <= set(rows)
    assert rows["source: prose"]["tokens"] + rows["source: photos"]["tokens"] == result["tokens"]
    responses = prefect_api.by_key(artifacts, "evaluate-prompts")["data"]
    assert [r["id"] for r in responses] == [json.loads(line)["id"] for line in lines]
    assert (tmp_path / "eval" / "prompts" / "annotate.html").is_file()
    assert state.result()["responses"] == 2


def test_loss_rows_leave_out_scopes_without_targets() -> None:
    from flows.evaluation_flows import loss_rows

    empty = {"loss": None, "perplexity": None, "tokens": 0}
    result = {"loss": 2.0, "perplexity": 7.389, "tokens": 10,
              "by_source": {"prose": {"loss": 2.0, "perplexity": 7.389, "tokens": 10}, "photos": empty},
              "by_modality": {"text": {"loss": 2.0, "perplexity": 7.389, "tokens": 10}, "image": empty}}  # fmt: skip
    assert [r["scope"] for r in loss_rows(result)] == ["all", "source: prose", "modality: text"]
