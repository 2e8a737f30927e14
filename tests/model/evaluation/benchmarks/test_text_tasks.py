"""Text-benchmark readers: each published format gives lm-evaluation-harness's prompt text, choices and gold index
(the expected strings are its task YAMLs' templates written out), few-shot examples come as its samplers draw them,
and a malformed file fails naming the file and the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.evaluation.benchmarks.text_tasks import (
    SAMPLE_TASKS,
    ChoiceDoc,
    TaskFileError,
    choice_requests,
    detect_format,
    fewshot_examples,
    prompt_prefix,
    read_task,
    resolve_task,
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", sorted(SAMPLE_TASKS))
def test_every_bundled_sample_reads_in_its_format(name: str) -> None:
    path, fewshot = resolve_task(name)
    task = read_task(path)
    assert task.format == name and len(task.docs) >= 5
    assert task.kind == ("generate" if name == "gsm8k" else "multiple_choice")
    for doc in task.docs:
        if isinstance(doc, ChoiceDoc):
            assert 0 <= doc.gold < len(doc.choices)
    if fewshot is not None:
        assert read_task(fewshot).format == name


def test_hellaswag_prompt_is_lm_evals_preprocessed_query() -> None:
    docs = read_task(resolve_task("hellaswag")[0]).docs
    assert docs[0].query == "Baking cookies: A woman pours flour into a large bowl. She"
    assert docs[0].choices[0] == "cracks two eggs into the bowl and stirs the mixture." and docs[0].gold == 0
    # WikiHow artifacts: " [title]" becomes ". ", other [tags] go, ctx_b is capitalize()d (rest lowercased).
    assert docs[2].query == "Home and Garden: How to water a houseplant. Check the soil. push a finger"


def test_arc_reads_ai2s_nested_layout_and_hfs_flat_one_alike(tmp_path: Path) -> None:
    ai2 = read_task(resolve_task("arc")[0]).docs[0]
    assert ai2.query == "Question: Which of these is a source of light?\nAnswer:"
    assert ai2.choices == ("a mirror", "the Sun", "the Moon at noon", "a window") and ai2.gold == 1
    flat = {
        "id": "x",
        "question": "Which of these is a source of light?",
        "choices": {"text": list(ai2.choices), "label": ["1", "2", "3", "4"]},
        "answerKey": "2",
    }
    assert read_task(write_jsonl(tmp_path / "ARC-Easy-test.jsonl", [flat])).docs[0] == ai2


def test_piqa_labels_come_from_the_labels_file_or_the_record(tmp_path: Path) -> None:
    doc = read_task(resolve_task("piqa")[0]).docs[2]
    assert doc.query == "Question: To dry wet shoes quickly,\nAnswer:" and doc.gold == 1
    write_jsonl(tmp_path / "piqa_dev.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    with pytest.raises(TaskFileError, match=r"piqa_dev-labels\.lst"):
        read_task(tmp_path / "piqa_dev.jsonl")
    (tmp_path / "piqa_dev-labels.lst").write_text("1\n")
    assert read_task(tmp_path / "piqa_dev.jsonl").docs[0].gold == 1
    write_jsonl(tmp_path / "piqa_x.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    assert read_task(tmp_path / "piqa_x.jsonl").docs[0].gold == 0


def test_winogrande_is_scored_partially_as_lm_eval_does() -> None:
    task = read_task(resolve_task("winogrande")[0])
    doc = task.docs[0]
    assert doc.partial and doc.gold == 0
    assert choice_requests(task, doc, []) == [
        ("The trophy does not fit into the suitcase because the trophy", " is too large."),
        ("The trophy does not fit into the suitcase because the suitcase", " is too large."),
    ]
    # A solved example shows the sentence with the right option filled in.
    shot = task.docs[1]
    assert prompt_prefix(task, doc, [shot]) == (
        "The trophy does not fit into the suitcase because the suitcase is too small.\n\n"
    )


def test_boolq_and_mmlu_and_gsm8k_prompts(tmp_path: Path) -> None:
    boolq = read_task(resolve_task("boolq")[0]).docs[1]
    assert boolq.query.endswith("\nQuestion: can penguins fly?\nAnswer:") and boolq.choices == ("no", "yes")
    assert boolq.gold == 0
    write_jsonl(tmp_path / "boolq_sg.jsonl", [{"question": "q", "passage": "p", "label": 1}])
    assert read_task(tmp_path / "boolq_sg.jsonl").docs[0].gold == 1

    mmlu = read_task(resolve_task("mmlu")[0])
    assert mmlu.name == "mmlu_astronomy" and mmlu.fewshot_sampler == "first_n"
    doc = mmlu.docs[0]
    assert doc.description == "The following are multiple choice questions (with answers) about astronomy.\n\n"
    assert doc.query == "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer:"
    assert doc.choices == ("A", "B", "C", "D") and doc.gold == 1
    hf = {"question": "Which planet is closest to the Sun?", "subject": "astronomy", "answer": 1}
    hf["choices"] = ["Venus", "Mercury", "Earth", "Mars"]
    assert read_task(write_jsonl(tmp_path / "mmlu.jsonl", [hf])).docs[0] == doc

    gsm = read_task(resolve_task("gsm8k")[0])
    assert gsm.docs[0].query.startswith("Question: Ali has 3 boxes") and gsm.docs[0].target.endswith("#### 12")
    assert gsm.until == ("Question:", "</s>", "<|im_end|>")


def test_k_shot_prompt_layout_is_description_examples_then_question() -> None:
    mmlu = read_task(resolve_task("mmlu")[0])
    dev = read_task(resolve_task("mmlu")[1]).docs
    shots = fewshot_examples(mmlu, 2, dev)
    assert shots[0] == list(dev[:2]) and shots[3] == list(dev[:2])  # first-n from the dev file, for every question
    (context, continuation), *_ = choice_requests(mmlu, mmlu.docs[0], shots[0])
    assert context == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        f"{dev[0].query} C\n\n{dev[1].query} A\n\n{mmlu.docs[0].query}"
    )
    assert continuation == " A"


def test_random_shots_are_seeded_and_never_the_question_itself() -> None:
    task = read_task(resolve_task("arc")[0])
    first = fewshot_examples(task, 3, seed=1234)
    assert first == fewshot_examples(task, 3, seed=1234)
    assert first != fewshot_examples(task, 3, seed=1)
    for doc, shots in zip(task.docs, first, strict=True):
        assert len(shots) == 3 and doc not in shots and len(set(shots)) == 3
    assert fewshot_examples(task, 0) == [[]] * len(task.docs)
    assert len(fewshot_examples(task, 2, limit=3)) == 3
    with pytest.raises(TaskFileError, match="8 shots asked, 7 other"):
        fewshot_examples(task, 8)


def test_first_n_from_the_task_itself_skips_the_question() -> None:
    mmlu = read_task(resolve_task("mmlu")[0])
    shots = fewshot_examples(mmlu, 2)
    assert shots[0] == list(mmlu.docs[1:3]) and shots[1] == [mmlu.docs[0], mmlu.docs[2]]


def test_format_is_found_from_the_name_or_the_fields(tmp_path: Path) -> None:
    assert detect_format(Path("ARC-Challenge-Test.jsonl")) == "arc"
    assert detect_format(Path("hellaswag_val.jsonl")) == "hellaswag"
    assert detect_format(Path("abstract_algebra_test.csv")) == "mmlu"
    sentence = {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}
    assert detect_format(write_jsonl(tmp_path / "dev.jsonl", [sentence])) == "winogrande"
    with pytest.raises(TaskFileError, match="cannot tell its format"):
        detect_format(write_jsonl(tmp_path / "other.jsonl", [{"text": "x"}]))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("hellaswag.jsonl", '{"activity_label": "a"}\nnot json\n', r"hellaswag.jsonl:2: not a JSON line"),
        ("hellaswag.jsonl", '{"activity_label": "a", "ctx_a": "b", "ctx_b": "c"}\n', "record 1: no 'endings'"),
        ("arc.jsonl", '{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "B"}\n', "B"),
        ("winogrande.jsonl", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n', "blank"),
        ("boolq.jsonl", '{"question": "q", "passage": "p", "label": 2}\n', "not one of the 2 choices"),
        ("astronomy_test.csv", "q,a,b,c,d,E\n", r"astronomy_test.csv:1: expected question"),
        ("gsm8k.jsonl", '{"question": "q", "answer": "12"}\n', "no '#### N'"),
        ("gsm8k.jsonl", "", "no questions"),
        ("boolq.jsonl", "[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_files_fail_naming_the_file_and_record(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskFileError, match=message):
        read_task(path)


def test_unknown_names_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="not a bundled task"):
        resolve_task("squad")
    with pytest.raises(TaskFileError, match="unknown task format"):
        read_task(resolve_task("arc")[0], "squad")
