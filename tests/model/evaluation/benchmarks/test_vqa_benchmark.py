"""Few-shot VQAv2: the question and annotation readers, the prompt, the runner on the tiny model, and `cham eval vqa`
(a checkpoint run and the scoring of a results file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.eval import app
from model.evaluation.benchmarks.image_to_text import BenchmarkError, run_vqa, vqa_pool, vqa_prompt, vqa_scores
from model.evaluation.benchmarks.image_to_text_data import BenchmarkFileError, read_vqa, read_vqa_results
from model.generation.inference import load_inference_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
SAMPLE, IMAGES = REPO / "sample" / "eval", REPO / "sample" / "images"
QUESTIONS, ANNOTATIONS = SAMPLE / "vqav2_questions.json", SAMPLE / "vqav2_annotations.json"
REFERENCE = json.loads((HERE / "fixtures" / "reference.json").read_text())["vqa"]
runner = CliRunner()


def write(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value))
    return path


def test_questions_are_read_with_their_answers_and_images() -> None:
    questions = read_vqa(QUESTIONS, ANNOTATIONS, IMAGES)
    assert len(questions) == 12 and all(len(q.answers) == 10 for q in questions)
    first = questions[0]
    assert (first.question_id, first.image_id, first.question) == (900201, 9002, "How many birds are there?")
    assert (
        first.file == IMAGES / "two_macaws.jpg" and first.answer_type == "number" and first.question_type == "how many"
    )
    assert first.shot_answer() == "2"
    assert read_vqa(QUESTIONS)[0].answers == [] and read_vqa(QUESTIONS)[0].file is None
    assert read_vqa_results(SAMPLE / "vqav2_results_example.json")[900201] == "two"


def test_published_image_names_are_found(tmp_path: Path) -> None:
    questions = {"data_subtype": "val2014", "questions": [{"question_id": 1, "image_id": 42, "question": "Why?"}]}
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"")
    assert read_vqa(write(tmp_path / "q.json", questions), images=tmp_path)[0].file == (
        tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    )
    with pytest.raises(BenchmarkFileError, match=r"image not found.*COCO_val2014_000000000042\.jpg"):
        read_vqa(tmp_path / "q.json", images=tmp_path / "val2014" / "...")


def test_malformed_files_are_one_clear_error(tmp_path: Path) -> None:
    question = {"question_id": 1, "image_id": 9002, "question": "What?"}
    answers = {"question_id": 1, "answers": [{"answer": "x"}]}
    cases = {
        "not a VQAv2 questions file": lambda: read_vqa(write(tmp_path / "a.json", {"question": []})),
        "questions[0]: no 'question'": lambda: read_vqa(
            write(tmp_path / "b.json", {"questions": [{"question_id": 1, "image_id": 2}]})
        ),
        "question_id 1 appears twice": lambda: read_vqa(write(tmp_path / "c.json", {"questions": [question] * 2})),
        "no annotation for question 1": lambda: read_vqa(
            write(tmp_path / "d.json", {"questions": [question]}), write(tmp_path / "e.json", {"annotations": []})
        ),
        "annotations[0].answers[0]: no 'answer'": lambda: read_vqa(
            tmp_path / "d.json", write(tmp_path / "f.json", {"annotations": [{**answers, "answers": [{}]}]})
        ),
        "annotations[0]: no answers": lambda: read_vqa(
            tmp_path / "d.json", write(tmp_path / "g.json", {"annotations": [{**answers, "answers": []}]})
        ),
        "'answer' is int": lambda: read_vqa_results(write(tmp_path / "h.json", [{"question_id": 1, "answer": 2}])),
    }
    for message, call in cases.items():
        with pytest.raises(BenchmarkFileError) as info:
            call()
        assert message in str(info.value) and str(tmp_path) in str(info.value), (message, str(info.value))


def test_prompt_and_pool() -> None:
    questions = read_vqa(QUESTIONS, ANNOTATIONS, IMAGES)
    segments = vqa_prompt(questions[:2], questions[4])
    assert segments == [
        questions[0].file,
        "Question: How many birds are there? Short answer: 2\n",
        questions[1].file,
        "Question: What color is the bird on the left? Short answer: red\n",
        questions[4].file,
        "Question: What is on the launch pad? Short answer:",
    ]
    assert vqa_pool(questions) == questions
    with pytest.raises(BenchmarkError, match="has no answers"):
        vqa_pool(questions, read_vqa(QUESTIONS))
    with pytest.raises(BenchmarkError, match="without their annotations"):
        vqa_scores(read_vqa(QUESTIONS), {})


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    return load_inference_model(tiny_run, device="cpu")


def test_run_vqa_on_the_tiny_model(loaded) -> None:
    questions = read_vqa(QUESTIONS, ANNOTATIONS, IMAGES)[:5]
    result = run_vqa(loaded, questions, vqa_pool(read_vqa(QUESTIONS, ANNOTATIONS, IMAGES)), max_new_tokens=4)
    assert result["benchmark"] == "vqav2" and result["items"] == 5 and result["shots"] == 2
    assert 0.0 <= result["accuracy"] <= 100.0 and set(result["by_answer_type"]) == {"number", "other", "yes/no"}
    by_id = {q.question_id: q for q in questions}
    for prediction in result["predictions"]:
        question = by_id[prediction["question_id"]]
        assert prediction["answer"] == prediction["generated"].split("\n")[0].strip().lower()
        assert len(prediction["shots"]) == 2 and prediction["question_id"] not in prediction["shots"]
        assert 0.0 <= prediction["accuracy"] <= 100.0 and prediction["image_id"] == question.image_id
    mean = sum(p["accuracy"] for p in result["predictions"]) / 5
    assert result["accuracy"] == pytest.approx(mean)


def test_cli_answers_with_a_checkpoint_and_scores_a_results_file(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "vqa.json"
    files = ["--questions", str(QUESTIONS), "--annotations", str(ANNOTATIONS)]
    result = runner.invoke(
        app,
        ["vqa", "--checkpoint", str(tiny_run), *files, "--images", str(IMAGES), "--limit", "3", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "VQAv2" in result.output
    written = json.loads(out.read_text())
    assert written["items"] == 3 and {"accuracy", "by_answer_type", "predictions", "checkpoint", "seed"} <= set(written)

    scored = tmp_path / "scored.json"
    results = ["--results", str(SAMPLE / "vqav2_results_example.json")]
    result = runner.invoke(app, ["vqa", *files, *results, "--out", str(scored)])
    assert result.exit_code == 0, result.output
    written = json.loads(scored.read_text())
    official = REFERENCE["sample"]["accuracy"]
    assert round(written["accuracy"], 2) == official["overall"] == 68.33
    assert {k: round(v, 2) for k, v in written["by_answer_type"].items()} == official["perAnswerType"]
    assert "68.33" in result.output


def test_cli_errors_are_one_line(tiny_run: Path, tmp_path: Path) -> None:
    files = ["--questions", str(QUESTIONS), "--annotations", str(ANNOTATIONS), "--out", str(tmp_path / "o.json")]
    partial = write(tmp_path / "partial.json", [{"question_id": 900201, "answer": "2"}])
    cases = {
        "give either --checkpoint": ["vqa", *files],
        "together": ["vqa", *files, "--results", str(partial), "--support-questions", str(QUESTIONS)],
        "have no answer": ["vqa", *files, "--results", str(partial)],
        "image not found": ["vqa", *files, "--checkpoint", str(tiny_run)],
        "shots asked for": [
            "vqa",
            *files,
            "--checkpoint",
            str(tiny_run),
            "--images",
            str(IMAGES),
            "--shots",
            "12",
        ],
    }
    for message, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (message, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
