"""Few-shot captioning: the COCO readers, the examples' choice and prompt, the runner on the tiny model, and
`cham eval captioning` (a checkpoint run and the scoring of a results file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.eval import app
from model.evaluation.benchmarks import image_to_text_data as data
from model.evaluation.benchmarks.image_to_text import (
    BenchmarkError,
    caption_pools,
    caption_prompt,
    choose_shots,
    first_line,
    run_captioning,
    shot_rng,
)
from model.evaluation.benchmarks.image_to_text_data import (
    BenchmarkFileError,
    read_caption_results,
    read_caption_set,
    read_coco_captions,
    read_coco_karpathy,
)
from model.generation.inference import load_inference_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
SAMPLE, IMAGES = REPO / "sample" / "eval", REPO / "sample" / "images"
REFERENCE = json.loads((HERE / "fixtures" / "reference.json").read_text())["captioning"]
runner = CliRunner()


def test_karpathy_file_is_read_with_splits_and_image_files() -> None:
    images = read_coco_karpathy(SAMPLE / "coco_karpathy.json", IMAGES)
    assert len(images) == 10 and all(len(i.captions) == 5 for i in images)
    assert [i.split for i in images].count("test") == 4 and [i.split for i in images].count("restval") == 1
    cat = next(i for i in images if i.image_id == 9007)
    assert cat.file == IMAGES / "tabby_cat_chelsea.jpg"  # val2014/ is not there: the file name in the folder
    assert cat.captions[0] == "A tabby cat looking to the side."
    assert read_coco_karpathy(SAMPLE / "coco_karpathy.json")[0].file is None  # no folder, no image lookup


def test_coco_annotations_and_results_are_read() -> None:
    kind, images = read_caption_set(SAMPLE / "coco_captions.json", IMAGES)
    assert kind == "coco" and len(images) == 10 and images[0].image_id == 9001 and images[0].split is None
    assert images[0].captions == read_coco_karpathy(SAMPLE / "coco_karpathy.json")[0].captions
    assert read_caption_set(SAMPLE / "coco_karpathy.json")[0] == "karpathy"
    results = read_caption_results(SAMPLE / "coco_results_example.json")
    assert len(results) == 10 and results[9007] == "a cat sitting on a couch"


def write(path: Path, value: object) -> Path:
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def test_malformed_files_are_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = {"filepath": "x", "filename": "tabby_cat_chelsea.jpg", "split": "test", "sentences": [{"raw": "a cat"}]}
    cases = {
        "not valid JSON": (read_coco_karpathy, write(tmp_path / "a.json", "{oops")),
        "no such file": (read_coco_karpathy, tmp_path / "missing.json"),
        "not a COCO-Karpathy file (no 'images' list)": (read_coco_karpathy, write(tmp_path / "b.json", [1])),
        "images[0]: no 'sentences'": (
            read_coco_karpathy,
            write(tmp_path / "c.json", {"images": [{"filename": "f.jpg", "split": "test"}]}),
        ),
        "images[0].sentences[0]: 'raw' is int, expected str": (
            read_coco_karpathy,
            write(tmp_path / "d.json", {"images": [{**good, "sentences": [{"raw": 3}]}]}),
        ),
        "appears twice": (read_coco_karpathy, write(tmp_path / "e.json", {"images": [good, good]})),
        "annotations[0]: no 'caption'": (
            read_coco_captions,
            write(tmp_path / "f.json", {"images": [], "annotations": [{"image_id": 1}]}),
        ),
        "not in its images list": (
            read_coco_captions,
            write(tmp_path / "g.json", {"images": [], "annotations": [{"image_id": 1, "caption": "x"}]}),
        ),
    }
    for message, (reader, path) in cases.items():
        with pytest.raises(BenchmarkFileError, match=None) as info:
            reader(path)
        assert message in str(info.value) and str(path) in str(info.value), (message, str(info.value))
    with pytest.raises(BenchmarkFileError, match="image not found"):
        read_coco_karpathy(write(tmp_path / "h.json", {"images": [{**good, "filename": "nope.jpg"}]}), IMAGES)
    with pytest.raises(BenchmarkFileError, match="appears twice"):
        read_caption_results(write(tmp_path / "r.json", [{"image_id": 1, "caption": "a"}] * 2))
    with pytest.raises(BenchmarkFileError, match="not a results file"):
        read_caption_results(write(tmp_path / "s.json", {"image_id": 1}))
    monkeypatch.setattr(data, "MAX_JSON_BYTES", 100)
    with pytest.raises(BenchmarkFileError, match="more than a benchmark file's 100"):
        read_coco_karpathy(SAMPLE / "coco_karpathy.json")


def test_shots_are_seeded_per_query_and_never_the_query_image() -> None:
    queries, pool = caption_pools(*read_caption_set(SAMPLE / "coco_karpathy.json", IMAGES), "test")
    assert len(queries) == 4 and len(pool) == 6 and {q.split for q in queries} == {"test"}
    first = [choose_shots(pool, 2, shot_rng(0, q.image_id), q.image_id) for q in queries]
    again = [choose_shots(pool, 2, shot_rng(0, q.image_id), q.image_id) for q in reversed(queries)]
    assert first == list(reversed(again))  # from the seed and the query only, not the order
    assert any(first != [choose_shots(pool, 2, shot_rng(1, q.image_id), q.image_id) for q in queries] for _ in [0])
    coco_queries, coco_pool = caption_pools(*read_caption_set(SAMPLE / "coco_captions.json", IMAGES), "test")
    for q in coco_queries:  # COCO annotations: examples from the other images of the file
        assert all(s.image_id != q.image_id for s in choose_shots(coco_pool, 9, shot_rng(0, q.image_id), q.image_id))
    with pytest.raises(BenchmarkError, match="support pool has 9"):
        choose_shots(coco_pool, 10, shot_rng(0, 1), coco_queries[0].image_id)
    with pytest.raises(BenchmarkError, match="no image of the split 'val'"):
        caption_pools(*read_caption_set(SAMPLE / "coco_karpathy.json"), "val")


def test_prompt_interleaves_examples_and_ends_with_the_query_image() -> None:
    images = read_coco_karpathy(SAMPLE / "coco_karpathy.json", IMAGES)
    segments = caption_prompt([(images[0], " A cup. "), (images[1], "Two birds.")], images[6])
    assert segments == [
        images[0].file,
        "Caption: A cup.\n",
        images[1].file,
        "Caption: Two birds.\n",
        images[6].file,
        "Caption:",
    ]
    assert first_line(" a cat on a mat\nCaption: more") == "a cat on a mat"


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    return load_inference_model(tiny_run, device="cpu")


def test_run_captioning_on_the_tiny_model(loaded) -> None:
    queries, pool = caption_pools(*read_caption_set(SAMPLE / "coco_karpathy.json", IMAGES), "test")
    seen = []
    result = run_captioning(loaded, queries, pool, max_new_tokens=8, batch_size=3, progress=lambda d, t: seen.append(d))
    assert seen == [3, 4]
    assert result["benchmark"] == "captioning" and result["items"] == 4 and result["shots"] == 2
    assert result["decoding"] == "greedy" and result["step"] == 30
    assert result["cider"] >= 0.0 and 0.0 <= result["bleu_4"] <= 1.0 and len(result["bleu"]) == 4
    for prediction, query in zip(result["predictions"], queries, strict=True):
        assert prediction["image_id"] == query.image_id and prediction["file"] == str(query.file)
        assert prediction["caption"] == first_line(prediction["generated"])
        assert len(prediction["shots"]) == 2 and query.image_id not in prediction["shots"]
        assert {"cider", "bleu_4"} <= set(prediction)
    one_by_one = run_captioning(loaded, queries[:2], pool, max_new_tokens=8, batch_size=1)
    assert [p["shots"] for p in one_by_one["predictions"]] == [p["shots"] for p in result["predictions"][:2]]


def test_cli_captions_with_a_checkpoint_and_scores_a_results_file(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval" / "captioning.json"
    args = ["captioning", "--checkpoint", str(tiny_run), "--data", str(SAMPLE / "coco_karpathy.json")]
    result = runner.invoke(app, [*args, "--images", str(IMAGES), "--out", str(out), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "CIDEr-D" in result.output and f"wrote {out}" in result.output.replace("\n", "")
    written = json.loads(out.read_text())
    assert written["format"] == "karpathy" and written["split"] == "test" and written["items"] == 4
    assert {"cider", "bleu_4", "bleu", "checkpoint", "step", "seed", "predictions"} <= set(written)

    # COCO annotations, examples from a Karpathy support file's train + restval images
    support = ["--support", str(SAMPLE / "coco_karpathy.json"), "--support-images", str(IMAGES)]
    coco = ["--data", str(SAMPLE / "coco_captions.json"), "--images", str(IMAGES), "--limit", "2"]
    out = tmp_path / "coco.json"
    result = runner.invoke(app, ["captioning", "--checkpoint", str(tiny_run), *coco, *support, "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["format"] == "coco" and written["items"] == 2 and "split" not in written
    support_ids = {i.image_id for i in read_coco_karpathy(SAMPLE / "coco_karpathy.json") if i.split != "test"}
    assert all(set(p["shots"]) <= support_ids for p in written["predictions"])

    scored = tmp_path / "scored.json"
    result = runner.invoke(
        app,
        [
            "captioning",
            "--data",
            str(SAMPLE / "coco_captions.json"),
            "--results",
            str(SAMPLE / "coco_results_example.json"),
            "--out",
            str(scored),
        ],
    )
    assert result.exit_code == 0, result.output
    written = json.loads(scored.read_text())
    assert written["cider"] == pytest.approx(REFERENCE["sample"]["cider"], rel=1e-12)
    assert written["bleu"] == pytest.approx(REFERENCE["sample"]["bleu"], rel=1e-12)
    assert written["format"] == "coco" and written["items"] == 10 and "checkpoint" not in written


def test_cli_errors_are_one_line(tiny_run: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "o.json")
    karpathy = str(SAMPLE / "coco_karpathy.json")
    cases = {
        "give either --checkpoint": ["captioning", "--data", karpathy, "--out", out],
        "image not found": ["captioning", "--checkpoint", str(tiny_run), "--data", karpathy, "--out", out],
        "no caption": [
            "captioning",
            "--data",
            karpathy,
            "--results",
            str(write(tmp_path / "partial.json", [{"image_id": 9007, "caption": "a cat"}])),
            "--out",
            out,
        ],
    }
    for message, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (message, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
