"""VQAv2 accuracy and answer normalisation against the official vqaEval.py's outputs on the same inputs
(fixtures/reference.json, written by fixtures/make_reference.py), and on values worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.evaluation.benchmarks.vqa_metrics import normalize_answer, score_vqa, vqa_accuracy

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parents[3] / "sample" / "eval"
REFERENCE = json.loads((HERE / "fixtures" / "reference.json").read_text())["vqa"]


@pytest.mark.parametrize("case", REFERENCE["normalisation"], ids=lambda c: c["answer"])
def test_normalisation_matches_the_official_code(case: dict) -> None:
    assert normalize_answer(case["answer"]) == case["normalised"]


@pytest.mark.parametrize("case", REFERENCE["accuracy_cases"], ids=lambda c: f"{c['answer']}-{c['accuracy']}")
def test_accuracy_matches_the_official_code(case: dict) -> None:
    assert round(100 * vqa_accuracy(case["answer"], case["humans"]), 2) == case["accuracy"]


def test_accuracy_worked_by_hand() -> None:
    # 3 of 10 humans said "2": leaving out one of those 3 leaves 2 matches (2/3), leaving out another leaves 3 (1);
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("two", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)
    assert vqa_accuracy("The Dog.", ["dog"] * 5 + ["cat"] * 5) == pytest.approx(1.0)
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # all agree: the official code compares without normalising
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("yes", [])


def test_sample_results_score_as_the_official_code() -> None:
    ref = REFERENCE["sample"]
    annotations = json.loads((SAMPLE / "vqav2_annotations.json").read_text())["annotations"]
    answers = {r["question_id"]: r["answer"] for r in json.loads((SAMPLE / "vqav2_results_example.json").read_text())}
    scores = score_vqa(annotations, answers)
    assert round(scores["accuracy"], 2) == ref["accuracy"]["overall"]
    assert {k: round(v, 2) for k, v in scores["by_answer_type"].items()} == ref["accuracy"]["perAnswerType"]
    assert {k: round(v, 2) for k, v in scores["by_question_type"].items()} == ref["accuracy"]["perQuestionType"]
    assert {str(k): round(v, 2) for k, v in scores["per_question"].items()} == ref["per_question"]
    with pytest.raises(ValueError, match="no answer"):
        score_vqa(annotations, {})
