"""`cham sample-data` output, read back with pyarrow and webdataset: counts, layouts, every image decodes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipelines.sample_corpus import SampleCorpus, SampleCorpusError, read_back, write_sample_data
from schemas import records


@pytest.fixture(scope="module")
def corpus() -> SampleCorpus:
    return SampleCorpus.load()


def test_bundled_corpus_has_what_the_issue_asks_for(corpus: SampleCorpus) -> None:
    assert 20 <= len(corpus.images) <= 30
    faces = [im for im in corpus.images if im["has_face"]]
    assert len(faces) >= 4 and len(corpus.images) - len(faces) >= 4
    assert all(im["license"] and im["source"] and len(im["caption"].split()) >= 5 for im in corpus.images)
    assert len(corpus.texts) == 200
    assert {d["kind"] for d in corpus.texts} == {"prose", "code"}
    assert len(corpus.interleaved) == 12
    for doc in corpus.interleaved:
        assert 1 <= sum("image" in s for s in doc["segments"]) <= 3
    assert len(corpus.sft) == 30
    assert set(p["category"] for p in corpus.sft) == set(records.SFT_CATEGORIES)
    safety = [p for p in corpus.sft if p["category"] == "safety"]
    assert safety and all(p["answer"] == [{"text": "I can't help with that."}] for p in safety)
    # Ids are unique within each kind.
    for rows in (corpus.texts, corpus.interleaved, corpus.sft):
        assert len({r["id"] for r in rows}) == len(rows)


def test_text_jsonl_and_parquet(sample_data, corpus: SampleCorpus) -> None:
    out, manifest = sample_data
    jsonl = [json.loads(line) for p in sorted((out / "text").glob("*.jsonl")) for line in p.open()]
    table = pq.read_table(out / "text" / "code-00000.parquet")
    assert table.schema.equals(records.TEXT, check_metadata=False)
    assert len(jsonl) == 130 and table.num_rows == 70
    assert pq.ParquetFile(out / "text" / "code-00000.parquet").num_row_groups == 5  # read in splits
    written = {r["id"]: r["text"] for r in jsonl} | dict(
        zip(table["id"].to_pylist(), table["text"].to_pylist(), strict=True)
    )
    assert written == {d["id"]: d["text"] for d in corpus.texts}
    assert manifest["text"]["records"] == 200


def test_image_text_is_img2dataset_webdataset(sample_data, corpus: SampleCorpus) -> None:
    out, manifest = sample_data
    tars = sorted((out / "image_text").glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:05d}.tar" for i in range(len(tars))]
    captions = {}
    for tar in tars:
        # img2dataset's sidecars: a parquet row and stats per shard.
        assert (tar.with_suffix(".parquet")).exists()
        stats = json.loads((tar.parent / f"{tar.stem}_stats.json").read_text())
        with tarfile.open(tar) as tf:
            members = tf.getmembers()
        assert {m.name.split(".", 1)[1] for m in members} == {"jpg", "txt", "json"}
        assert all(m.mtime == 0 for m in members)
        count = 0
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            key = sample["__key__"]
            assert key.isdigit() and len(key) == 9 and "." not in key
            meta = json.loads(sample["json"])
            image = Image.open(io.BytesIO(sample["jpg"]))
            image.load()
            assert (image.width, image.height) == (meta["width"], meta["height"])
            assert sample["txt"].decode() == meta["caption"] and meta["status"] == "success"
            captions[meta["url"].rsplit("/", 1)[1]] = meta["caption"]
            count += 1
        assert stats["count"] == stats["successes"] == count
    assert captions == {im["file"]: im["caption"] for im in corpus.images}
    assert manifest["image_text"]["records"] == len(corpus.images)


def test_interleaved_is_obelics_parquet(sample_data, corpus: SampleCorpus) -> None:
    out, manifest = sample_data
    table = pq.read_table(out / "interleaved" / "obelics-00000.parquet")
    assert table.schema.equals(records.INTERLEAVED, check_metadata=False)
    rows = table.to_pylist()
    assert len(rows) == 12
    n_images = 0
    for row, doc in zip(rows, corpus.interleaved, strict=True):
        assert len(row["texts"]) == len(row["images"]) == len(json.loads(row["metadata"]))
        for text, image, seg in zip(row["texts"], row["images"], doc["segments"], strict=True):
            assert (text is None) != (image is None)  # exactly one set at each position
            if image is not None:
                assert image["bytes"] == (corpus.root / "images" / seg["image"]).read_bytes()
                Image.open(io.BytesIO(image["bytes"])).load()
                n_images += 1
            else:
                assert text == seg["text"]
    assert n_images == manifest["interleaved"]["images"]


def test_sft_jsonl_with_local_images(sample_data, corpus: SampleCorpus) -> None:
    out, _ = sample_data
    pairs = [json.loads(line) for line in (out / "sft" / "pairs.jsonl").open()]
    assert len(pairs) == 30
    n_images = 0
    for pair in pairs:
        assert pair["category"] in records.SFT_CATEGORIES
        for seg in pair["prompt"] + pair["answer"]:
            assert len(seg) == 1
            if "image" in seg:
                with Image.open(out / "sft" / seg["image"]) as image:  # relative to the jsonl file
                    image.load()
                n_images += 1
    assert n_images >= 8
    categories = {p["category"] for p in pairs if any("image" in s for s in p["answer"])}
    assert "image_generation" in categories


def test_read_back_counts_match_the_manifest(sample_data) -> None:
    out, manifest = sample_data
    counts = read_back(out)
    assert {k: counts[k] for k in ("text", "image_text", "interleaved", "sft")} == {
        k: manifest[k]["records"] for k in ("text", "image_text", "interleaved", "sft")
    }
    assert counts["images_decoded"] == (
        manifest["image_text"]["records"]
        + manifest["interleaved"]["images"]
        + sum(1 for p in SampleCorpus.load().sft for s in p["prompt"] + p["answer"] if "image" in s)
    )


def test_rewrite_is_byte_identical_and_needs_force(sample_data, tmp_path: Path) -> None:
    out, _ = sample_data
    again = tmp_path / "again"
    write_sample_data(again)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        assert (again / path.relative_to(out)).read_bytes() == path.read_bytes(), path
    with pytest.raises(FileExistsError, match="--force"):
        write_sample_data(again)
    write_sample_data(again, overwrite=True)
    assert not (tmp_path / "again.tmp").exists()


def test_corpus_naming_a_missing_image_is_refused(tmp_path: Path, corpus: SampleCorpus) -> None:
    import shutil

    shutil.copytree(corpus.root, tmp_path / "sample", ignore=shutil.ignore_patterns("tools"))
    docs = tmp_path / "sample" / "interleaved" / "docs.jsonl"
    doc = json.loads(docs.read_text().splitlines()[0])
    doc["segments"].append({"image": "no_such_photo.jpg"})
    docs.write_text(json.dumps(doc) + "\n")
    with pytest.raises(SampleCorpusError, match=r"names image 'no_such_photo\.jpg'"):
        SampleCorpus.load(tmp_path / "sample")
