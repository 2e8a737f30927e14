"""The human-evaluation harness: prompt files, responses and pages, blinding, and the annotation scorer."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.evaluation.annotation_page import SCRIPT, absolute_page, annotation_line
from model.evaluation.annotation_score import read_annotations, read_blinding, score_annotations
from model.evaluation.human_eval import (
    EvalFileError,
    make_comparison,
    prompt_seed,
    read_prompts,
    read_responses,
    run_prompts,
)
from model.generation.inference import load_inference_model
from model.generation.prompting import PromptError
from schemas.eval_prompts import ABSOLUTE_LABELS, EvalPrompt

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "sample" / "eval"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def relative_file(path: Path, votes: dict[str, tuple[str, str, str]], category: str = "how-to") -> Path:
    return write_lines(
        path,
        [
            annotation_line("relative", item, category, f"ann{k}", label)
            for item, labels in votes.items()
            for k, label in enumerate(labels, 1)
        ],
    )


# --- the scorer -----------------------------------------------------------------------------------------------


def test_absolute_scores_of_the_hand_made_example_are_exact() -> None:
    # espresso F F P (two agree -> F), deep-field D P F (none -> P), raccoon F F F (all), monarchs D D P (two -> D)
    result = score_annotations(read_annotations([SAMPLE / "annotations-example.jsonl"]))
    assert result["task"] == "absolute" and result["items"] == 4
    assert result["rates"] == {"fulfills": 0.5, "partially_fulfills": 0.25, "does_not_fulfill": 0.25}
    assert result["agreement"] == {"all_agree": 0.25, "two_agree": 0.5, "none_agree": 0.25}
    assert result["agreement_counts"] == {"all_agree": 1, "two_agree": 2, "none_agree": 1}
    assert result["by_category"]["how-to"]["rates"] == {
        "fulfills": 1.0,
        "partially_fulfills": 0.0,
        "does_not_fulfill": 0.0,
    }
    assert result["by_category"]["explanation"]["rates"]["partially_fulfills"] == 1.0
    assert result["by_category"]["explanation"]["agreement"]["none_agree"] == 1.0
    assert result["by_category"]["report"]["counts"] == {"fulfills": 0, "partially_fulfills": 0, "does_not_fulfill": 1}


def test_relative_scores_are_unblinded_with_the_map(tmp_path: Path) -> None:
    firsts = {"x1": "A", "x2": "B", "x3": "B", "x4": "A"}
    blinding = {
        "seed": 7,
        "systems": {"A": "a.jsonl", "B": "b.jsonl"},
        "items": {item: {"first": first} for item, first in firsts.items()},
    }
    votes = {
        "x1": ("first_wins", "first_wins", "first_wins"),  # A shown first, all pick it: A wins, all agree
        "x2": ("first_wins", "first_wins", "tie"),  # B shown first, two pick it: B wins (loss for A)
        "x3": ("second_wins", "second_wins", "second_wins"),  # B shown first, all pick the other: A wins
        "x4": ("first_wins", "tie", "second_wins"),  # no agreement: a tie, as in the paper
    }
    result = score_annotations(read_annotations([relative_file(tmp_path / "rel.jsonl", votes)]), blinding)
    assert result["rates"] == {"win": 0.5, "tie": 0.25, "loss": 0.25}
    assert result["counts"] == {"win": 2, "tie": 1, "loss": 1}
    assert result["agreement"] == {"all_agree": 0.5, "two_agree": 0.25, "none_agree": 0.25}
    assert result["systems"] == {"A": "a.jsonl", "B": "b.jsonl"}
    assert result["unannotated_items"] == []


def test_annotations_may_come_in_one_file_per_annotator(tmp_path: Path) -> None:
    lines = (SAMPLE / "annotations-example.jsonl").read_text().splitlines()
    files = [write_lines(tmp_path / f"ann{k}.jsonl", [ln for ln in lines if f'"ann{k}"' in ln]) for k in (1, 2, 3)]
    together = score_annotations(read_annotations([SAMPLE / "annotations-example.jsonl"]))
    assert score_annotations(read_annotations(files)) == together


def test_bad_annotation_files_get_clear_errors(tmp_path: Path) -> None:
    good = [annotation_line("absolute", "q1", "story", f"ann{k}", "fulfills") for k in (1, 2, 3)]
    bad_label = write_lines(tmp_path / "label.jsonl", [*good[:2], good[2].replace('"fulfills"', '"great"')])
    with pytest.raises(
        EvalFileError,
        match=r"label\.jsonl:3: label: 'great' is not a absolute label; allowed: "
        r"fulfills, partially_fulfills, does_not_fulfill",
    ):
        read_annotations([bad_label])
    two = write_lines(tmp_path / "two.jsonl", good[:2])
    with pytest.raises(
        EvalFileError,
        match=r"item 'q1' has 2 annotator\(s\) \(ann1, ann2\); every item needs "
        r"exactly 3",
    ):
        score_annotations(read_annotations([two]))
    four = write_lines(tmp_path / "four.jsonl", [*good, good[0].replace("ann1", "ann4")])
    with pytest.raises(EvalFileError, match="has 4 annotator"):
        score_annotations(read_annotations([four]))
    twice = write_lines(tmp_path / "twice.jsonl", [*good, good[0]])
    with pytest.raises(EvalFileError, match=r"twice\.jsonl:4: annotator 'ann1' already judged item 'q1' at .*:1"):
        score_annotations(read_annotations([twice]))
    with pytest.raises(EvalFileError, match=r"good\.jsonl:1: item 'q1' is not one of the evaluated items"):
        score_annotations(read_annotations([write_lines(tmp_path / "good.jsonl", good)]), known_items={"q2"})
    votes = {"zz": ("tie", "tie", "tie")}
    unknown = relative_file(tmp_path / "unknown.jsonl", votes)
    blinding = {"systems": {}, "items": {"q1": {"first": "A"}}}
    with pytest.raises(EvalFileError, match=r"unknown\.jsonl:1: item 'zz' is not one of the evaluated items"):
        score_annotations(read_annotations([unknown]), blinding)
    with pytest.raises(EvalFileError, match="need the blinding map"):
        score_annotations(read_annotations([unknown]))
    mixed = write_lines(tmp_path / "mixed.jsonl", [*good, annotation_line("relative", "q1", "story", "ann1", "tie")])
    with pytest.raises(EvalFileError, match=r"mixed\.jsonl:4: a relative annotation among absolute ones"):
        score_annotations(read_annotations([mixed]))
    recat = write_lines(tmp_path / "recat.jsonl", [*good[:2], good[2].replace("story", "report")])
    with pytest.raises(EvalFileError, match="category 'report' here but 'story' at"):
        score_annotations(read_annotations([recat]))
    with pytest.raises(EvalFileError, match=r"broken\.jsonl:2: not valid JSON"):
        read_annotations([write_lines(tmp_path / "broken.jsonl", [good[0], "{oops"])])
    two_problems = r"missing\.jsonl:1: 2 problems\n  - annotator: Field required\n  - who: unknown key"
    with pytest.raises(EvalFileError, match=two_problems):
        read_annotations([write_lines(tmp_path / "missing.jsonl", [good[0].replace('"annotator"', '"who"')])])
    (tmp_path / "map.json").write_text(json.dumps({"items": {"q1": {"first": "C"}}}))
    with pytest.raises(EvalFileError, match="not a blinding map"):
        read_blinding(tmp_path / "map.json")


# --- prompt files ---------------------------------------------------------------------------------------------


def test_the_sample_prompt_file_reads_with_its_images() -> None:
    prompts = read_prompts(SAMPLE / "prompts.jsonl")
    assert 8 <= len(prompts) <= 12 and len({p.id for p in prompts}) == len(prompts)
    with_images = [p for p in prompts if p.images]
    assert 2 <= len(with_images) <= 3
    assert all(Path(i).is_absolute() and Path(i).is_file() for p in with_images for i in p.images)
    assert {"how-to", "brainstorming", "comparison", "explanation", "story", "report"} <= {p.category for p in prompts}


def test_bad_prompt_lines_name_file_line_and_field(tmp_path: Path) -> None:
    ok = json.dumps({"id": "p1", "prompt": "hi", "category": "story"})
    cases = {
        "no category": ({"id": "p2", "prompt": "hi"}, r":2: category: Field required"),
        "bad id": ({"id": "a b", "prompt": "hi", "category": "x"}, r":2: id: String should match pattern"),
        "empty": ({"id": "p2", "prompt": " ", "category": "x"}, r":2: prompt: give prompt text, images, or both"),
        "extra key": ({"id": "p2", "prompt": "hi", "category": "x", "img": []}, r":2: img: unknown key"),
        "no image": (
            {"id": "p2", "prompt": "hi", "category": "x", "images": ["nope.jpg"]},
            r":2: images\[0\]: no such image file .*nope\.jpg",
        ),
        "same id": ({"id": "p1", "prompt": "again", "category": "x"}, r":2: id: 'p1' is already used on line 1"),
    }
    for name, (record, message) in cases.items():
        path = write_lines(tmp_path / f"{name}.jsonl", [ok, json.dumps(record)])
        with pytest.raises(EvalFileError, match=re.escape(str(path)) + message):
            read_prompts(path)
    with pytest.raises(EvalFileError, match="file not found"):
        read_prompts(tmp_path / "absent.jsonl")


# --- responses and pages --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    return load_inference_model(tiny_run, device="cpu")


def test_run_prompts_writes_responses_images_and_the_page(loaded, tmp_path: Path) -> None:
    photo = REPO / "sample" / "images" / "tabby_cat_chelsea.jpg"
    prompts = [
        EvalPrompt(id="cat", prompt="Draw a cat like this one.", images=[str(photo)], category="story"),
        EvalPrompt(id="sky", prompt="A sky at dusk.", category="report"),
    ]
    tpi = loaded.vocab.tokens_per_image
    records = run_prompts(loaded, prompts, tmp_path / "a", mode="image", max_new_tokens=tpi + 2, seed=3)
    assert [r["id"] for r in records] == ["cat", "sky"]
    assert [r["seed"] for r in records] == [prompt_seed(3, "cat"), prompt_seed(3, "sky")]
    assert read_responses(tmp_path / "a" / "responses.jsonl") == records
    for r in records:  # image mode: exactly one image per response, its PNG written, its codes recorded
        (image,) = r["response"]
        assert image["kind"] == "image" and len(image["codes"]) == tpi and r["new_tokens"] == tpi + 2
        assert (tmp_path / "a" / image["path"]).is_file()
    assert records[0]["prompt_images"] == ["images/prompts/cat-0.png"]
    assert max(Image.open(tmp_path / "a" / "images/prompts/cat-0.png").size) == 256
    page = (tmp_path / "a" / "annotate.html").read_text()
    for r in records:
        assert f"data-item='{r['id']}'" in page and f'src="{r["response"][0]["path"]}"' in page
        assert all(f"name='choice-{r['id']}' value='{label}'" in page for label in ABSOLUTE_LABELS)
    assert 'src="images/prompts/cat-0.png"' in page and "Draw a cat like this one." in page
    assert "http" not in page  # no external assets
    # The same seed gives the same responses.
    again = run_prompts(loaded, prompts[1:], tmp_path / "b", mode="image", max_new_tokens=tpi + 2, seed=3)
    assert again[0]["response"][0]["codes"] == records[1]["response"][0]["codes"]


@pytest.mark.parametrize("mode", ["text", "image"])
def test_batched_prompts_give_the_responses_of_one_at_a_time(loaded, tmp_path: Path, mode: str) -> None:
    photo = REPO / "sample" / "images" / "tabby_cat_chelsea.jpg"
    prompts = [
        EvalPrompt(id="a", prompt="The function", category="how-to"),
        EvalPrompt(id="b", prompt="Lists are mutable sequences, typically used to", category="report"),
        EvalPrompt(id="c", prompt="What is this?", images=[str(photo)], category="story"),
    ]
    budget = loaded.vocab.tokens_per_image + 2 if mode == "image" else 12
    alone = run_prompts(loaded, prompts, tmp_path / "one", mode=mode, max_new_tokens=budget, seed=5)
    batched = run_prompts(loaded, prompts, tmp_path / "two", mode=mode, max_new_tokens=budget, seed=5, batch_size=2)
    assert [r["id"] for r in batched] == ["a", "b", "c"]
    for one, two in zip(alone, batched, strict=True):
        assert one["seed"] == two["seed"] and one["new_tokens"] == two["new_tokens"] > 0
        if mode == "text":
            assert one["response"] == two["response"]
        else:
            assert one["response"][0]["codes"] == two["response"][0]["codes"]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_prompts(loaded, prompts, tmp_path / "zero", batch_size=0)


def test_a_failing_prompt_keeps_the_responses_before_it(loaded, tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    prompts = [
        EvalPrompt(id="p1", prompt="The function", category="how-to"),
        EvalPrompt(id="p2", prompt="What is this?", images=[str(not_an_image)], category="report"),
    ]
    for batch_size in (1, 2):  # decoded together, the batch falls back to one at a time to name the bad prompt
        out = tmp_path / f"out{batch_size}"
        with pytest.raises(PromptError, match=r"prompt 'p2': .*the 1 responses before it are in .*responses\.jsonl"):
            run_prompts(loaded, prompts, out, mode="text", max_new_tokens=4, seed=0, batch_size=batch_size)
        assert [r["id"] for r in read_responses(out / "responses.jsonl")] == ["p1"]


def _fake_responses(folder: Path, system: str, ids: list[str]) -> Path:
    """A responses.jsonl whose text names the system and whose image's colour does too."""
    (folder / "images").mkdir(parents=True)
    colour = (255, 0, 0) if system == "A" else (0, 0, 255)
    records = []
    for i in ids:
        Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(folder / "images" / f"{i}-1.png")
        records.append(
            {
                "id": i,
                "category": "how-to",
                "prompt": f"question {i}",
                "prompt_images": [],
                "response": [
                    {"kind": "text", "text": f"answer of {system}"},
                    {"kind": "image", "codes": [0], "path": f"images/{i}-1.png"},
                ],
            }
        )
    path = folder / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_comparison_is_blinded_and_the_scorer_unblinds_it(tmp_path: Path) -> None:
    ids = [f"q{k}" for k in range(12)]
    a, b = _fake_responses(tmp_path / "sa", "A", ids), _fake_responses(tmp_path / "sb", "B", ids)
    mapping = make_comparison(a, b, tmp_path / "cmp", seed=11)
    assert mapping == read_blinding(tmp_path / "cmp" / "blinding.json")
    assert mapping["seed"] == 11 and set(mapping["items"]) == set(ids)
    firsts = [mapping["items"][i]["first"] for i in ids]
    assert {"A", "B"} == set(firsts)  # the order really varies per item
    assert make_comparison(a, b, tmp_path / "again", seed=11)["items"] == mapping["items"]  # the seed decides it
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert str(tmp_path / "sa") not in page and str(tmp_path / "sb") not in page  # nothing on the page names a system
    sections = page.split("<section class='item'")[1:]
    votes = {}
    for item_id, section in zip(ids, sections, strict=True):
        # Response 1 is system A's exactly when the map says so; its image is a blinded copy of A's.
        one, _ = section.split("<h3>Response 2</h3>")
        assert ("answer of A" in one) == (mapping["items"][item_id]["first"] == "A")
        (src,) = re.findall(r'src="(images/[^"]+)"', one)
        assert src == f"images/{item_id}-1-1.png"
        red = Image.open(tmp_path / "cmp" / src).getpixel((0, 0))[0] == 255
        assert red == (mapping["items"][item_id]["first"] == "A")
        votes[item_id] = ("first_wins" if "answer of A" in one else "second_wins",) * 3  # annotators who prefer A
    scores = score_annotations(read_annotations([relative_file(tmp_path / "votes.jsonl", votes)]), mapping)
    assert scores["rates"] == {"win": 1.0, "tie": 0.0, "loss": 0.0}
    c = _fake_responses(tmp_path / "sc", "B", ids[:-1])
    with pytest.raises(EvalFileError, match=r"answer different prompts \(only in A: \['q11'\]"):
        make_comparison(a, c, tmp_path / "bad")


# A stand-in DOM for the page's script: two answered items and one unanswered, the annotator's name typed in.
DOM_STUB = """
const items = [['s1', 'story', 'fulfills'], ['s2', 'story', 'does_not_fulfill'], ['s3', 'story', null]];
globalThis.document = {
  getElementById: () => ({value: ' ann1 '}),
  querySelectorAll: () => items.map(([item, category, label]) => ({dataset: {item, category},
    querySelector: () => (label ? {value: label} : null)})),
  createElement: () => ({click() { process.stdout.write(globalThis.saved + '|' + this.download); }}),
};
globalThis.confirm = () => true; globalThis.alert = (m) => { throw new Error(m); };
globalThis.Blob = class { constructor(parts) { globalThis.saved = parts.join(''); } };
globalThis.URL = {createObjectURL: () => 'blob:x'};
downloadAnnotations('absolute');
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node runs the page's script")
def test_the_download_button_writes_what_the_scorer_reads(tmp_path: Path) -> None:
    records = [
        {"id": i, "category": "story", "prompt": "p", "prompt_images": [], "response": [{"kind": "text", "text": "r"}]}
        for i in ("s1", "s2")
    ]
    assert SCRIPT in absolute_page(records)
    script = SCRIPT.removeprefix("<script>").removesuffix("</script>")
    harness = script + DOM_STUB
    out = subprocess.run(["node", "-e", harness], capture_output=True, text=True, check=True, timeout=30).stdout
    content, name = out.rsplit("|", 1)
    assert name == "annotations-absolute-ann1.jsonl"
    path = tmp_path / name
    path.write_text(content)
    got = [(a.item, a.annotator, a.label) for _, a in read_annotations([path])]
    assert got == [("s1", "ann1", "fulfills"), ("s2", "ann1", "does_not_fulfill")]
