"""`cham eval prompt-stats | filter-pages | filter | baseline-prompts | augment` and `score --prompts`: the paper's
human-evaluation steps from the command line, on the sample files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from flows.cli.eval import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "sample" / "eval"
PROMPTS = SAMPLE / "prompts.jsonl"


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def test_prompt_stats_shows_and_writes_the_shares(tmp_path: Path) -> None:
    result = invoke("prompt-stats", PROMPTS, "--out", tmp_path / "stats.json")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["prompt_modality"] == {"mixed_modal": 3, "text_only": 7, "image_only": 0}
    assert stats["by_category"]["explanation"]["prompt_modality_shares"]["mixed_modal"] == 1.0
    assert "30%" in result.output and "70%" in result.output and "explanation" in result.output
    (header,) = [line for line in result.output.splitlines() if "category" in line]
    assert header.split() == [
        "category",
        "prompts",
        "mixed",
        "text",
        "ans",
        "mixed",
        "ans",
        "text",
        "ans",
        "?",
    ]  # no image-only column: every prompt has text
    bad = invoke("prompt-stats", tmp_path / "missing.jsonl")
    assert bad.exit_code == 1 and "missing.jsonl: file not found" in bad.output


def test_filter_pages_then_filter_writes_the_kept_set_and_report(tmp_path: Path) -> None:
    pages = invoke(
        "filter-pages", "--prompts", PROMPTS, "--annotator", "ann1", "--annotator", "ann2", "--out", tmp_path
    )
    assert pages.exit_code == 0, pages.output
    assert (tmp_path / "filter-ann1.html").is_file() and (tmp_path / "filter-ann2.html").is_file()
    kept = tmp_path / "kept" / "prompts.jsonl"
    args = ["filter", SAMPLE / "filter-labels-example.jsonl", "--prompts", PROMPTS, "--out", kept]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in kept.read_text().splitlines()][:2] == ["howto-espresso", "howto-tulips"]
    report = json.loads((tmp_path / "kept" / "prompts-report.json").read_text())
    assert (report["rule"], report["kept"], report["dropped"]) == ("majority", 7, {"unclear": 2, "not_mixed_modal": 1})
    assert "7 of 10 kept" in result.output and "labels 0.267, keep or drop 0.250" in result.output
    unanimous = invoke(*args, "--rule", "unanimous", "--report", tmp_path / "u.json")
    assert unanimous.exit_code == 0 and json.loads((tmp_path / "u.json").read_text())["kept"] == 4
    stats = invoke("prompt-stats", kept)  # the kept set reads back, its answers expected mixed-modal
    assert stats.exit_code == 0 and "ans mixed" in stats.output
    assert json.loads(kept.read_text().splitlines()[0])["expects"] == "mixed"
    bad_rule = invoke(*args, "--rule", "most")
    assert bad_rule.exit_code == 1 and "--rule most: one of majority, unanimous" in bad_rule.output
    one = tmp_path / "one.jsonl"
    one.write_text(SAMPLE.joinpath("filter-labels-example.jsonl").read_text().replace('"keep"', '"yes"', 1))
    bad = invoke("filter", one, "--prompts", PROMPTS, "--out", tmp_path / "x.jsonl")
    assert bad.exit_code == 1 and f"{one}:1: label" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_augmented_baseline_end_to_end_with_a_folder_of_images(tmp_path: Path) -> None:
    baseline_prompts = tmp_path / "baseline-prompts.jsonl"
    result = invoke("baseline-prompts", "--prompts", PROMPTS, "--out", baseline_prompts)
    assert result.exit_code == 0, result.output
    assert "<caption>" in json.loads(baseline_prompts.read_text().splitlines()[0])["prompt"]
    out = tmp_path / "baseline"
    first = invoke("augment", SAMPLE / "baseline-answers-example.jsonl", "--prompts", PROMPTS, "--out", out)
    assert first.exit_code == 0, first.output
    assert "12 captions, 1 empty, 1 unclosed, 1 nested, 1 stray close" in first.output
    assert not (out / "responses.jsonl").exists()
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    for line in (out / "captions.jsonl").read_text().splitlines():
        shutil.copy(REPO / "sample" / "images" / "two_macaws.jpg", drawn / f"{json.loads(line)['image']}.jpg")
    args = ["augment", SAMPLE / "baseline-answers-example.jsonl", "--prompts", PROMPTS, "--out", out]
    second = invoke(*args, "--images", drawn)
    assert second.exit_code == 0, second.output
    assert len((out / "responses.jsonl").read_text().splitlines()) == 10
    both = invoke(*args, "--images", drawn, "--checkpoint", tmp_path)
    assert both.exit_code == 1 and "not both" in both.output
    (drawn / "story-raccoon-1.jpg").unlink()
    missing = invoke(*args, "--images", drawn)
    assert missing.exit_code == 1 and "no image for 1 caption(s): story-raccoon-1" in missing.output


def test_augment_draws_with_our_model_and_compare_takes_it(tiny_run: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "fox", "prompt": "Show me a fox.", "category": "story"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"id": "fox", "answer": "A fox: <caption>a red fox</caption>", "system": "api"}))
    out = tmp_path / "baseline"
    result = invoke("augment", answers, "--prompts", prompts, "--out", out, "--checkpoint", tiny_run, "--seed", "2")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert record["system"] == "api" and (out / record["response"][1]["path"]).is_file()
    text_only = ["--mode", "text", "--max-new-tokens", "4"]
    ours = invoke("prompts", "--checkpoint", tiny_run, "--prompts", prompts, "--out", tmp_path / "ours", *text_only)
    assert ours.exit_code == 0, ours.output
    compare = invoke("compare", tmp_path / "ours" / "responses.jsonl", out / "responses.jsonl", "--out", tmp_path / "c")
    assert compare.exit_code == 0, compare.output


def test_score_reports_the_prompt_set(tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    result = invoke("score", SAMPLE / "annotations-example.jsonl", "--prompts", PROMPTS, "--out", out)
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert scores["items"] == 4 and scores["prompt_set"]["prompts"] == 10
    assert scores["prompt_set"]["prompt_modality"]["mixed_modal"] == 3
    assert scores["unannotated_items"][:2] == ["advice-photography", "article-windsurfing"]
    assert "the prompt set: 10 prompts" in result.output
    other = tmp_path / "other.jsonl"
    other.write_text(PROMPTS.read_text().splitlines()[0] + "\n")
    bad = invoke("score", SAMPLE / "annotations-example.jsonl", "--prompts", other, "--out", out)
    assert bad.exit_code == 1 and "is not one of the evaluated items" in bad.output
