"""The generate and evaluate flows under the Prefect test harness, on a tiny pretrained run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.evaluation_flows import evaluate, generate

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


HOSTILE_PROMPT = "The function <img src=http://127.0.0.1:9/x> [click](javascript:alert(1)) <script>alert(1)</script>"


def no_markup(markdown: str) -> None:
    """`markdown` rendered (CommonMark with raw HTML) has no tag that fetches, links or runs anything."""
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)
    assert "<a " not in rendered and "<script" not in rendered and "<img src=http" not in rendered, rendered
    assert "<img" not in markdown.replace('<img src="data:image/png', "") and "](javascript:" not in markdown


def test_generate_flow_shows_text_and_images(prefect_api, tiny_run: Path, tmp_path: Path) -> None:
    from flows.markup import escape_markdown

    text = generate(
        checkpoint=str(tiny_run),
        prompt=HOSTILE_PROMPT,
        out_dir=str(tmp_path / "text"),
        mode="text",
        max_new_tokens=16,
        seed=3,
        return_state=True,
    )
    assert text.is_completed(), text.message
    record = json.loads((tmp_path / "text" / "generation.json").read_text())
    words = "".join(s["text"] for s in record["segments"])
    assert text.result()["text"] == words and words.strip()
    shown = prefect_api.by_key(prefect_api.artifacts(text.state_details.flow_run_id), "generate-text")["data"]
    assert f"**Prompt:** {escape_markdown(HOSTILE_PROMPT)}" in shown and f"{record['new_tokens']} new tokens" in shown
    assert "&lt;img src=http\\://127.0.0.1:9/x&gt;" in shown  # the prompt is shown as text
    assert escape_markdown(words.strip().splitlines()[0]) in shown and "data:image/png" not in shown
    no_markup(shown)

    photo = sorted((REPO / "sample" / "images").glob("*.jpg"))[0]
    image = generate(
        checkpoint=str(tiny_run),
        prompt="A photo like this",
        out_dir=str(tmp_path / "image"),
        mode="image",
        images=[str(photo)],
        return_state=True,
    )
    assert image.is_completed(), image.message
    (png,) = image.result()["images"]
    shown = prefect_api.by_key(prefect_api.artifacts(image.state_details.flow_run_id), "generate-image")["data"]
    from flows.artifacts import png_data_uri

    assert shown.count("data:image/png;base64,") == 1 and png_data_uri(Path(png)) in shown
    no_markup(shown)


def test_evaluate_flow_reports_heldout_loss_and_responses(prefect_api, tiny_run: Path, make_stage, tmp_path) -> None:
    heldout = make_stage(3_000, prose_weight=2.0)
    prompts = tmp_path / "prompts.jsonl"
    lines = (REPO / "sample" / "eval" / "prompts.jsonl").read_text().splitlines()[:1]
    lines.append(json.dumps({"id": "hostile", "category": "other", "prompt": HOSTILE_PROMPT + "\n# heading | a | b |"}))
    prompts.write_text("\n".join(lines) + "\n")
    state = evaluate(
        checkpoint=str(tiny_run),
        out_dir=str(tmp_path / "eval"),
        stage=str(heldout),
        prompts=str(prompts),
        max_batches=2,
        mode="text",
        max_new_tokens=8,
        return_state=True,
    )
    assert state.is_completed(), state.message
    result = json.loads((tmp_path / "eval" / "eval-loss.json").read_text())
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    rows = {r["scope"]: r for r in prefect_api.by_key(artifacts, "evaluate-loss")["data"]}
    assert rows["all"]["loss"] == pytest.approx(result["loss"], abs=1e-4) and rows["all"]["tokens"] == result["tokens"]
    assert {"source: prose", "source: photos"} <= set(rows)
    assert rows["source: prose"]["tokens"] + rows["source: photos"]["tokens"] == result["tokens"]
    responses = prefect_api.by_key(artifacts, "evaluate-prompts")["data"]
    assert [r["id"] for r in responses] == [json.loads(line)["id"] for line in lines]
    shown = responses[1]["prompt"]  # the V1 UI renders a string cell as markdown: nothing in it may fetch or link
    assert shown.startswith("The function &lt;img src=http\\://127.0.0.1:9/x> \\[click\\](javascript\\:alert(1))")
    for row in responses:
        no_markup(row["prompt"] + "\n" + row["response"])
    assert (tmp_path / "eval" / "prompts" / "annotate.html").is_file()
    assert state.result()["responses"] == 2


def test_loss_rows_leave_out_scopes_without_targets() -> None:
    from flows.evaluation_flows import loss_rows

    empty = {"loss": None, "perplexity": None, "tokens": 0}
    result = {
        "loss": 2.0,
        "perplexity": 7.389,
        "tokens": 10,
        "by_source": {"prose": {"loss": 2.0, "perplexity": 7.389, "tokens": 10}, "photos": empty},
        "by_modality": {"text": {"loss": 2.0, "perplexity": 7.389, "tokens": 10}, "image": empty},
    }
    assert [r["scope"] for r in loss_rows(result)] == ["all", "source: prose", "modality: text"]


def test_evaluate_flow_runs_the_benchmarks(prefect_api, tiny_run: Path, tmp_path) -> None:
    """Text benchmarks (ARC, GSM8K), captioning and VQAv2 on the bundled sample files, 1 shot, 2 items each: a table
    per benchmark and a summary whose scores are those of the result files."""
    sample = REPO / "sample"
    state = evaluate(
        checkpoint=str(tiny_run),
        out_dir=str(tmp_path / "eval"),
        captioning=str(sample / "eval" / "coco_karpathy.json"),
        captioning_images=str(sample / "images"),
        vqa_questions=str(sample / "eval" / "vqav2_questions.json"),
        vqa_annotations=str(sample / "eval" / "vqav2_annotations.json"),
        vqa_images=str(sample / "images"),
        text_tasks=["arc", "gsm8k"],
        shots=1,
        benchmark_limit=2,
        return_state=True,
    )
    assert state.is_completed(), state.message
    arc = json.loads((tmp_path / "eval" / "text-0-arc.json").read_text())
    gsm8k = json.loads((tmp_path / "eval" / "text-1-gsm8k.json").read_text())
    assert arc["questions"] == 2 and arc["shots"] == 1
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    rows = {r["metric"]: r for r in prefect_api.by_key(artifacts, "evaluate-text-0")["data"]}
    assert rows["acc_norm"]["value"] == round(arc["metrics"]["acc_norm"], 4)
    assert rows["acc"]["stderr"] == round(arc["metrics"]["acc_stderr"], 4)
    captioning = json.loads((tmp_path / "eval" / "captioning.json").read_text())
    vqa = json.loads((tmp_path / "eval" / "vqa.json").read_text())
    assert captioning["items"] == 2 and vqa["items"] == 2 and captioning["shots"] == 1
    summary = {r["benchmark"]: r for r in prefect_api.by_key(artifacts, "evaluate-benchmarks")["data"]}
    assert (summary[arc["task"]]["metric"], summary[arc["task"]]["score"]) == (
        "acc_norm",
        round(arc["metrics"]["acc_norm"], 4),
    )
    assert summary[gsm8k["task"]]["metric"] == "exact_match,strict-match"
    assert summary["captioning"]["score"] == round(captioning["cider"], 4)
    assert summary["vqav2"]["score"] == round(vqa["accuracy"], 4)
    (row,) = prefect_api.by_key(artifacts, "evaluate-captioning")["data"]
    assert row["CIDEr-D"] == round(captioning["cider"], 4) and row["BLEU-4"] == round(captioning["bleu_4"], 4)
    accuracy = {r["answers"]: r["accuracy"] for r in prefect_api.by_key(artifacts, "evaluate-vqa")["data"]}
    assert accuracy["all"] == round(vqa["accuracy"], 2)
    answers = prefect_api.by_key(artifacts, "evaluate-vqa-samples")["data"]
    assert [a["answer"] for a in answers] == [p["answer"] for p in vqa["predictions"]]
    assert state.result()["benchmarks"] == {
        arc["task"]: arc["metrics"]["acc_norm"],
        gsm8k["task"]: gsm8k["metrics"]["exact_match,strict-match"],
        "captioning": captioning["cider"],
        "vqav2": vqa["accuracy"],
    }
