"""Prompt filtering by several annotators: pages, label files, agreement (Fleiss' kappa), the kept set."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from model.evaluation.annotation_page import SCRIPT
from model.evaluation.human_eval import EvalFileError, read_prompts
from model.evaluation.prompt_files import write_prompts
from model.evaluation.prompt_filtering import (
    filter_prompts,
    fleiss_kappa,
    read_filter_labels,
    write_filter_pages,
)
from schemas.eval_prompts import EvalPrompt

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "sample" / "eval"
LABELS = SAMPLE / "filter-labels-example.jsonl"


def label_line(item: str, annotator: str, label: str, category: str = "how-to") -> str:
    return json.dumps({"task": "filter", "item": item, "category": category, "annotator": annotator, "label": label})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- Fleiss' kappa ----------------------------------------------------------------------------------------------


def test_fleiss_kappa_matches_the_published_worked_example() -> None:
    # Wikipedia's "Fleiss' kappa" worked example: 10 subjects, 14 raters, 5 categories; P = 0.378, Pe = 0.213,
    # kappa = 0.210.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-5)


def test_fleiss_kappa_edges() -> None:
    assert fleiss_kappa([[3, 0], [0, 3]]) == pytest.approx(1.0)  # perfect agreement
    assert fleiss_kappa([[3, 0], [3, 0]]) is None  # every rating in one category: chance agreement is 1
    # two raters who always disagree on two categories: P = 0, Pe = 0.5 -> -1
    assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[3, 0], [1, 1]])
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[1, 0]])


# --- the sample: every figure by hand ---------------------------------------------------------------------------


def test_majority_rule_on_the_sample_labels(tmp_path: Path) -> None:
    prompts = read_prompts(SAMPLE / "prompts.jsonl")
    kept, report = filter_prompts(prompts, read_filter_labels([LABELS]), rule="majority")
    assert [p.id for p in kept] == [
        "howto-espresso",
        "howto-tulips",
        "brainstorm-garden",
        "compare-birds",
        "story-raccoon",
        "report-monarchs",
        "article-windsurfing",
    ]
    assert all(p.expects == "mixed" for p in kept)
    assert report["annotators"] == ["ann1", "ann2", "ann3"]
    assert (report["prompts"], report["kept"]) == (10, 7)
    # explain-rocket (unclear, not mixed-modal, keep: no majority, a tie of drop reasons -> unclear)
    assert report["dropped"] == {"unclear": 2, "not_mixed_modal": 1}
    assert report["items"]["explain-rocket"] == {
        "category": "explanation",
        "labels": {"ann1": "unclear", "ann2": "not_mixed_modal", "ann3": "keep"},
        "decision": "unclear",
        "agreement": "no_majority",
    }
    assert report["agreement_counts"] == {"all_agree": 5, "majority_agree": 4, "no_majority": 1}
    assert report["agreement"] == {"all_agree": 0.5, "majority_agree": 0.4, "no_majority": 0.1}
    assert report["label_counts"] == {"keep": 20, "unclear": 5, "not_mixed_modal": 5}
    # by hand: P = (5 + 4/3) / 10 = 19/30, Pe = (2/3)^2 + 2 (1/6)^2 = 1/2 -> 4/15;
    # keep or drop: P = (5 + 5/3) / 10 = 2/3, Pe = (2/3)^2 + (1/3)^2 = 5/9 -> 1/4
    assert report["fleiss_kappa"]["labels"] == pytest.approx(4 / 15)
    assert report["fleiss_kappa"]["keep_or_drop"] == pytest.approx(0.25)
    assert report["by_category"]["explanation"] == {
        "prompts": 2,
        "kept": 0,
        "dropped": {"unclear": 1, "not_mixed_modal": 1},
        "kept_share": 0.0,
        "agreement": {"all_agree": 0.0, "majority_agree": 0.5, "no_majority": 0.5},
        "agreement_counts": {"all_agree": 0, "majority_agree": 1, "no_majority": 1},
    }
    before, after = report["prompt_set"]["before"], report["prompt_set"]["kept"]
    assert before["prompt_modality"] == {"mixed_modal": 3, "text_only": 7, "image_only": 0}
    assert before["expected_answer"] == {"mixed": 0, "text": 0, "unknown": 10}
    assert after["prompt_modality"] == {"mixed_modal": 1, "text_only": 6, "image_only": 0}
    assert after["expected_answer"] == {"mixed": 7, "text": 0, "unknown": 0}


def test_unanimous_rule_keeps_only_what_all_keep() -> None:
    prompts = read_prompts(SAMPLE / "prompts.jsonl")
    kept, report = filter_prompts(prompts, read_filter_labels([LABELS]), rule="unanimous")
    assert [p.id for p in kept] == ["howto-espresso", "brainstorm-garden", "story-raccoon", "report-monarchs"]
    assert report["rule"] == "unanimous" and report["dropped"] == {"unclear": 3, "not_mixed_modal": 3}
    assert report["fleiss_kappa"]["labels"] == pytest.approx(4 / 15)  # agreement does not depend on the rule
    with pytest.raises(ValueError, match="rule"):
        filter_prompts(prompts, read_filter_labels([LABELS]), rule="plurality")


def test_the_kept_set_is_a_prompt_file_with_its_images_found(tmp_path: Path) -> None:
    prompts = read_prompts(SAMPLE / "prompts.jsonl")
    kept, _ = filter_prompts(prompts, read_filter_labels([LABELS]))
    out = write_prompts(kept, tmp_path / "elsewhere" / "kept.jsonl")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    birds = next(line for line in lines if line["id"] == "compare-birds")
    assert not Path(birds["images"][0]).is_absolute() and birds["expects"] == "mixed"
    again = read_prompts(out)  # relative image paths resolve from the new file's folder
    assert [p.id for p in again] == [p.id for p in kept]
    assert again[3].images == kept[3].images and again[3].prompt == kept[3].prompt
    assert "expects" not in json.loads((SAMPLE / "prompts.jsonl").read_text().splitlines()[0])


def test_one_file_per_annotator_gives_the_same_result(tmp_path: Path) -> None:
    lines = LABELS.read_text().splitlines()
    files = [
        write_lines(tmp_path / f"annotations-filter-ann{k}.jsonl", [x for x in lines if f'"ann{k}"' in x])
        for k in (1, 2, 3)
    ]
    prompts = read_prompts(SAMPLE / "prompts.jsonl")
    assert (
        filter_prompts(prompts, read_filter_labels(files))[1]
        == filter_prompts(prompts, read_filter_labels([LABELS]))[1]
    )


# --- bad label files --------------------------------------------------------------------------------------------


def test_bad_labels_get_errors_naming_file_and_line(tmp_path: Path) -> None:
    prompts = [EvalPrompt(id="a", prompt="Show me a cat.", category="how-to")]
    good = [label_line("a", "x", "keep"), label_line("a", "y", "unclear")]

    def error(lines: list[str]) -> str:
        path = write_lines(tmp_path / "labels.jsonl", lines)
        with pytest.raises(EvalFileError) as info:
            filter_prompts(prompts, read_filter_labels([path]))
        return str(info.value)

    where = str(tmp_path / "labels.jsonl")
    assert error([*good, "{not json"]) == f"{where}:3: not valid JSON (Expecting property name enclosed in " + (
        "double quotes at column 2)"
    )
    assert f"{where}:2" in error([good[0], label_line("a", "y", "maybe")]) and "label" in error(
        [good[0], label_line("a", "y", "maybe")]
    )
    assert error([*good, label_line("a", "x", "unclear")]) == (
        f"{where}:3: annotator 'x' already labelled prompt 'a' at {where}:1"
    )
    assert error([*good, label_line("b", "x", "keep")]) == f"{where}:3: prompt 'b' is not in the prompt file"
    assert error([good[0], label_line("a", "y", "keep", category="story")]) == (
        f"{where}:2: prompt 'a' has category 'story' here but 'how-to' in the prompt file"
    )
    assert "at least two annotators" in error([good[0]])
    assert f"{where}:1: task" in error([label_line("a", "x", "keep").replace('"filter"', '"absolute"'), good[1]])


def test_a_prompt_an_annotator_skipped_is_named(tmp_path: Path) -> None:
    prompts = [EvalPrompt(id=i, prompt="Show me.", category="how-to") for i in ("a", "b", "c")]
    lines = [label_line(i, a, "keep") for i in ("a", "b", "c") for a in ("x", "y")][:-1]  # y skipped c
    path = write_lines(tmp_path / "labels.jsonl", lines)
    with pytest.raises(EvalFileError, match=r"annotator 'y' has no label for 1 prompt\(s\): c; every annotator"):
        filter_prompts(prompts, read_filter_labels([path]))


# --- the pages --------------------------------------------------------------------------------------------------


def test_filter_pages_escape_user_text_and_download_what_is_read_back(tmp_path: Path) -> None:
    photo = REPO / "sample" / "images" / "two_macaws.jpg"
    prompts = [
        EvalPrompt(id="p1", prompt="<script>alert('x')</script> & draw", category="a<b>", images=[str(photo)]),
        EvalPrompt(id="p2", prompt="Explain tides.", category="explanation"),
    ]
    pages = write_filter_pages(prompts, ["ann1", "o.k-2"], tmp_path)
    assert [p.name for p in pages] == ["filter-ann1.html", "filter-o.k-2.html"]
    page = pages[1].read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; draw" in page
    assert "data-category='a&lt;b&gt;'" in page and "value='o.k-2'" in page
    assert page.count("<section class='item'") == 2 and SCRIPT in page
    assert "downloadAnnotations('filter')" in page
    for value in ("keep", "unclear", "not_mixed_modal"):
        assert page.count(f"value='{value}'") == 2
    assert '<img src="images/prompts/p1-0.png"' in page and (tmp_path / "images/prompts/p1-0.png").is_file()
    with pytest.raises(EvalFileError, match="annotator names"):
        write_filter_pages(prompts, ["../evil"], tmp_path)
    with pytest.raises(EvalFileError, match="repeat"):
        write_filter_pages(prompts, ["a", "a"], tmp_path)


# A stand-in DOM for the page's script: the name filled in by the page, two prompts labelled, one not.
DOM_STUB = """
const items = [['p1', 'story', 'keep'], ['p2', 'how-to', 'not_mixed_modal'], ['p3', 'how-to', null]];
globalThis.document = {
  getElementById: () => ({value: 'ann2'}),
  querySelectorAll: () => items.map(([item, category, label]) => ({dataset: {item, category},
    querySelector: () => (label ? {value: label} : null)})),
  createElement: () => ({click() { process.stdout.write(globalThis.saved + '|' + this.download); }}),
};
globalThis.confirm = () => true; globalThis.alert = (m) => { throw new Error(m); };
globalThis.Blob = class { constructor(parts) { globalThis.saved = parts.join(''); } };
globalThis.URL = {createObjectURL: () => 'blob:x'};
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node runs the page's script")
def test_the_filter_page_downloads_what_filter_reads(tmp_path: Path) -> None:
    prompts = [EvalPrompt(id="p1", prompt="Draw a fox.", category="story")]
    (page,) = write_filter_pages(prompts, ["ann2"], tmp_path)
    html = page.read_text()
    script = html[html.index("<script>") + len("<script>") : html.index("</script>")]
    call = html[html.index('onclick="') + len('onclick="') :].split('"', 1)[0]  # the button's own call
    assert call == "downloadAnnotations('filter')"
    out = subprocess.run(
        ["node", "-e", script + DOM_STUB + call], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    content, name = out.rsplit("|", 1)
    assert name == "annotations-filter-ann2.jsonl"
    (tmp_path / name).write_text(content)
    got = [
        (where.rsplit(":", 1)[1], a.item, a.annotator, a.label) for where, a in read_filter_labels([tmp_path / name])
    ]
    assert got == [("1", "p1", "ann2", "keep"), ("2", "p2", "ann2", "not_mixed_modal")]
