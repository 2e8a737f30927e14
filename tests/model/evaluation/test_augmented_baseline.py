"""Augmented baselines: the caption-tag instruction, tag extraction, images from a folder or our model, the
responses file `cham eval compare` reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.evaluation.augmented_baseline import (
    CAPTION_INSTRUCTION,
    CAPTIONS_FILE,
    augment_baseline,
    baseline_prompts,
    caption_images,
    extract_captions,
    read_answers,
)
from model.evaluation.human_eval import EvalFileError, make_comparison, prompt_seed, read_prompts, read_responses
from model.evaluation.prompt_files import write_prompts
from model.generation.inference import load_inference_model
from schemas.eval_prompts import EvalPrompt

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "sample" / "eval"
ANSWERS = SAMPLE / "baseline-answers-example.jsonl"
PHOTO = REPO / "sample" / "images" / "two_macaws.jpg"


def answer_lines(path: Path, answers: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "answer": v}) + "\n" for k, v in answers.items()))
    return path


# --- extraction -------------------------------------------------------------------------------------------------


def test_tags_are_split_out_with_the_text_around_them() -> None:
    got = extract_captions("Brew it.\n<caption>A  cup of\n espresso</caption>\nDone.")
    assert got.segments == [("text", "Brew it.\n"), ("caption", "A cup of espresso"), ("text", "\nDone.")]
    assert dict(got.counts) == {"captions": 1}
    assert extract_captions("<CAPTION>a</ caption ><Caption >b</CAPTION>").segments == [
        ("caption", "a"),
        ("caption", "b"),
    ]
    assert extract_captions("plain text, no tags").segments == [("text", "plain text, no tags")]
    assert extract_captions("").segments == []


@pytest.mark.parametrize(
    ("answer", "segments", "counts"),
    [
        # unclosed: the caption runs to the end
        ("Look: <caption>a red fox", [("text", "Look: "), ("caption", "a red fox")], {"captions": 1, "unclosed": 1}),
        # nested: one caption, the inner tags dropped
        (
            "<caption>a fox <caption>in snow</caption> at dusk</caption> end",
            [("caption", "a fox in snow at dusk"), ("text", " end")],
            {"captions": 1, "nested": 1},
        ),
        # empty: no image, the text around it joins up
        ("before <caption>  \n </caption> after", [("text", "before  after")], {"empty": 1}),
        # a stray closing tag is dropped
        ("one</caption> two", [("text", "one two")], {"stray_close": 1}),
        # several irregularities in one answer
        (
            "<caption></caption>x<caption>a<caption>b",
            [("text", "x"), ("caption", "ab")],
            {"empty": 1, "nested": 1, "unclosed": 1, "captions": 1},
        ),
    ],
)
def test_irregular_tags_are_repaired_and_counted(answer: str, segments: list, counts: dict) -> None:
    got = extract_captions(answer)
    assert got.segments == segments and dict(got.counts) == counts


# --- the baseline's prompt file and its answers -----------------------------------------------------------------


def test_the_baseline_prompt_file_carries_the_instruction(tmp_path: Path) -> None:
    prompts = read_prompts(SAMPLE / "prompts.jsonl")
    out = write_prompts(baseline_prompts(prompts), tmp_path / "baseline" / "prompts.jsonl")
    again = read_prompts(out)
    assert [p.id for p in again] == [p.id for p in prompts]
    assert again[0].prompt == f"{prompts[0].prompt}\n\n{CAPTION_INSTRUCTION}"
    assert again[3].images == prompts[3].images  # image paths re-based on the new folder
    assert "<caption>" in CAPTION_INSTRUCTION and "</caption>" in CAPTION_INSTRUCTION
    image_only = EvalPrompt(id="i", images=[str(PHOTO)], category="other")
    assert baseline_prompts([image_only])[0].prompt == CAPTION_INSTRUCTION


def test_bad_answer_files_name_file_and_line(tmp_path: Path) -> None:
    prompts = [EvalPrompt(id=i, prompt="Show me.", category="how-to") for i in ("a", "b")]
    path = tmp_path / "answers.jsonl"

    def error(text: str) -> str:
        path.write_text(text)
        with pytest.raises(EvalFileError) as info:
            read_answers(path, prompts)
        return str(info.value)

    a, b = json.dumps({"id": "a", "answer": "x"}), json.dumps({"id": "b", "answer": "y"})
    assert error(f"{a}\n{b}\n{a}\n") == f"{path}:3: id 'a' already answered on line 1"
    assert error(f"{a}\n{json.dumps({'id': 'c', 'answer': 'z'})}\n") == (
        f"{path}:2: id 'c' is not a prompt of the prompt file"
    )
    assert error(f"{a}\n") == f"{path}: no answer for 1 prompt(s): b"
    assert error(f"{a}\n{{oops\n").startswith(f"{path}:2: not valid JSON")
    assert error(f"{a}\n{json.dumps({'id': 'b', 'text': 'y'})}\n").startswith(f"{path}:2")


# --- images from a folder ---------------------------------------------------------------------------------------


def fill_folder(folder: Path, captions_file: Path) -> list[dict]:
    """A user's folder of generated images: one image per caption, named as captions.jsonl says, a colour each."""
    folder.mkdir(parents=True)
    captions = [json.loads(line) for line in captions_file.read_text().splitlines()]
    for k, item in enumerate(captions):
        Image.fromarray(np.full((32, 32, 3), (k * 20, 0, 255 - k * 20), np.uint8)).save(folder / f"{item['image']}.jpg")
    return captions


def test_the_sample_answers_become_a_responses_file_compare_reads(tmp_path: Path) -> None:
    prompts = read_prompts(SAMPLE / "prompts.jsonl")
    out = tmp_path / "baseline"
    summary = augment_baseline(prompts, ANSWERS, out)  # no images yet: only the captions to draw
    assert summary == {
        "answers": 10,
        "captions": 12,
        "empty": 1,
        "unclosed": 1,
        "nested": 1,
        "stray_close": 1,
        "answers_with_images": 8,
        "captions_file": str(out / CAPTIONS_FILE),
        "responses": None,
    }
    assert not (out / "responses.jsonl").exists()
    captions = fill_folder(tmp_path / "drawn", out / CAPTIONS_FILE)
    assert captions[2:5] == [
        {
            "id": "brainstorm-garden",
            "index": 0,
            "caption": "Basil, thyme and mint in a wooden vertical planter on a balcony wall",
            "image": "brainstorm-garden-0",
        },
        {
            "id": "brainstorm-garden",
            "index": 1,
            "caption": "Cherry tomato plants in terracotta pots with ripe red fruit",
            "image": "brainstorm-garden-1",
        },
        {
            "id": "brainstorm-garden",
            "index": 2,
            "caption": "A balcony railing box overflowing with purple petunias",  # unclosed: to the end
            "image": "brainstorm-garden-2",
        },
    ]
    summary = augment_baseline(prompts, ANSWERS, out, images=tmp_path / "drawn")
    assert summary["responses"] == str(out / "responses.jsonl")
    records = {r["id"]: r for r in read_responses(out / "responses.jsonl")}
    birds = records["compare-birds"]
    assert birds["prompt"] == prompts[3].prompt and birds["prompt_images"] == ["images/prompts/compare-birds-0.png"]
    assert birds["response"] == [
        {
            "kind": "text",
            "text": "Macaws are much larger, with long tails and bare facial patches; pet-shop parrots such as "
            "budgies are small.\n",
        },
        {
            "kind": "image",
            "path": "images/compare-birds-0.png",
            "caption": "A green budgerigar perched on a finger close-up in a living room",
        },
        {"kind": "text", "text": "\nBoth are social birds."},
    ]
    assert birds["system"] == "text-only-baseline" and birds["caption_counts"]["nested"] == 1
    assert records["explain-rocket"]["response"][0]["text"].count("\n\n") == 1  # the empty caption left no image
    assert [s["kind"] for s in records["explain-rocket"]["response"]] == ["text"]
    # the user's images (jpg, 32 px) are copied as PNG under the names the page uses
    garden = Image.open(out / "images" / "brainstorm-garden-2.png")
    assert garden.format == "PNG" and garden.getpixel((0, 0)) == pytest.approx((80, 0, 175), abs=3)
    page = (out / "annotate.html").read_text()
    assert page.count("<section class='item'") == 10 and '<img src="images/compare-birds-0.png"' in page
    assert "budgerigar" not in page  # the caption is replaced by its image, not shown

    # our model's responses to the same prompts: the two files make a blinded comparison
    ours = tmp_path / "ours"
    ours.mkdir()
    fake = [
        {
            "id": p.id,
            "category": p.category,
            "prompt": p.prompt,
            "prompt_images": [f"prompts/{p.id}.png" for _ in p.images],
            "response": [{"kind": "text", "text": "ours"}],
        }
        for p in prompts
    ]
    (ours / "prompts").mkdir()
    for p in prompts:
        if p.images:
            shutil.copy(out / "images" / "prompts" / f"{p.id}-0.png", ours / "prompts" / f"{p.id}.png")
    (ours / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake))
    mapping = make_comparison(ours / "responses.jsonl", out / "responses.jsonl", tmp_path / "cmp", seed=3)
    assert len(mapping["items"]) == 10 and (tmp_path / "cmp" / "compare.html").is_file()


def test_missing_or_doubled_images_are_named(tmp_path: Path) -> None:
    prompts = [EvalPrompt(id="a", prompt="Show me.", category="how-to")]
    answers = answer_lines(tmp_path / "answers.jsonl", {"a": "<caption>x</caption><caption>y</caption>"})
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    Image.new("RGB", (4, 4)).save(drawn / "a-0.png")
    with pytest.raises(EvalFileError, match=r"no image for 1 caption\(s\): a-1 \(name each"):
        augment_baseline(prompts, answers, tmp_path / "out", images=drawn)
    Image.new("RGB", (4, 4)).save(drawn / "a-1.png")
    Image.new("RGB", (4, 4)).save(drawn / "a-1.jpg")
    with pytest.raises(EvalFileError, match=r"2 images for a-1 \(a-1\.png, a-1\.jpg\)"):
        augment_baseline(prompts, answers, tmp_path / "out", images=drawn)
    (drawn / "a-1.jpg").write_bytes(b"not an image")
    (drawn / "a-1.png").unlink()
    with pytest.raises(EvalFileError, match=r"a-1\.jpg: cannot read this image"):
        augment_baseline(prompts, answers, tmp_path / "out", images=drawn)


# --- images by our model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    return load_inference_model(tiny_run, device="cpu")


def test_our_model_draws_each_caption_with_its_own_seed(loaded, tmp_path: Path) -> None:
    prompts = [
        EvalPrompt(id="fox", prompt="Show me a fox.", category="story"),
        EvalPrompt(id="tea", prompt="How do I brew tea?", category="how-to"),
    ]
    answers = answer_lines(
        tmp_path / "answers.jsonl",
        {"fox": "Here: <caption>a red fox</caption> and <caption>a fox cub</caption>", "tea": "Steep it 3 minutes."},
    )
    seen = []
    summary = augment_baseline(
        prompts,
        answers,
        tmp_path / "out",
        draw=lambda captions, out: caption_images(loaded, captions, out, seed=5, on_image=seen.append),
        source="tiny",
    )
    assert summary["captions"] == 2 and [s["image"] for s in seen] == ["fox-0", "fox-1"]
    records = read_responses(tmp_path / "out" / "responses.jsonl")
    fox = records[0]["response"]
    assert [s["kind"] for s in fox] == ["text", "image", "text", "image"]
    assert fox[1]["path"] == "images/fox-0.png" and fox[1]["caption"] == "a red fox"
    assert len(fox[1]["codes"]) == loaded.vocab.tokens_per_image and fox[1]["seed"] == prompt_seed(5, "fox-0")
    assert Image.open(tmp_path / "out" / fox[3]["path"]).size[0] > 0
    assert records[0]["augmented_with"] == "tiny" and records[1]["response"] == [
        {"kind": "text", "text": "Steep it 3 minutes."}
    ]
    # the same caption and seed draw the same image again
    again = caption_images(loaded, [{"image": "fox-0", "caption": "a red fox"}], tmp_path / "again", seed=5)
    assert again["fox-0"]["codes"] == fox[1]["codes"]


def test_the_docs_quote_the_instruction_as_sent() -> None:
    assert CAPTION_INSTRUCTION in (REPO / "docs" / "evaluation.md").read_text()
