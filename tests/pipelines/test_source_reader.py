"""Readers: every sample format into canonical records; splits; broken inputs become counted rejects."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.raw_records import Reject
from pipelines.source_reader import plan_read_tasks, read_task
from schemas.prepare_config import SourceConfig


def read_all(source: SourceConfig, **split) -> tuple[list[dict], list[Reject]]:
    records, rejects = [], []
    for task in plan_read_tasks(source, **split):
        for item in read_task(task):
            (rejects if isinstance(item, Reject) else records).append(item)
    return records, rejects


def source(name: str, kind: str, fmt: str, *paths: Path, **options) -> SourceConfig:
    return SourceConfig(name=name, kind=kind, format=fmt, paths=[str(p) for p in paths], options=options)


def test_every_sample_format(sample_data) -> None:
    out, manifest = sample_data
    cases = {
        ("text", "jsonl", "text/*.jsonl"): 130,
        ("text", "parquet", "text/*.parquet"): 70,
        ("image_text", "webdataset", "image_text"): 24,
        ("interleaved", "parquet", "interleaved"): 12,
        ("sft", "jsonl", "sft/pairs.jsonl"): 30,
    }
    for (kind, fmt, path), expected in cases.items():
        records, rejects = read_all(source("s", kind, fmt, out / path))
        assert (len(records), rejects) == (expected, []), (kind, fmt)
        assert len({r["id"] for r in records}) == expected
    photos, _ = read_all(source("p", "image_text", "webdataset", out / "image_text"))
    assert photos[0]["id"] == "00000.tar/000000000"
    assert photos[0]["image"]["bytes"][:2] == b"\xff\xd8" and photos[0]["text"].startswith("Portrait of astronaut")
    pairs, _ = read_all(source("q", "sft", "jsonl", out / "sft/pairs.jsonl"))
    images = [seg["image"]["path"] for p in pairs for seg in p["prompt"] + p["answer"] if seg["image"]]
    assert images and all(Path(p).is_file() for p in images)  # relative paths resolved against the jsonl file
    docs, _ = read_all(source("d", "interleaved", "parquet", out / "interleaved"))
    assert sum(im is not None for d in docs for im in d["images"]) == manifest["interleaved"]["images"]


def test_jsonl_and_parquet_splits_give_the_same_records(sample_data) -> None:
    out, _ = sample_data
    jsonl = source("t", "text", "jsonl", out / "text/*.jsonl")
    whole, _ = read_all(jsonl)
    split, _ = read_all(jsonl, jsonl_split_bytes=997)
    assert len(plan_read_tasks(jsonl, jsonl_split_bytes=997)) > 100
    assert sorted(r["id"] for r in split) == sorted(r["id"] for r in whole)
    assert {r["id"]: r["text"] for r in split} == {r["id"]: r["text"] for r in whole}
    parquet = source("c", "text", "parquet", out / "text/*.parquet")
    assert len(plan_read_tasks(parquet, parquet_split_rows=16)) == 5
    assert read_all(parquet, parquet_split_rows=16)[0] == read_all(parquet)[0]


@pytest.fixture()
def broken(tmp_path: Path, sample_data) -> Path:
    """A corpus of broken records in every format."""
    out, _ = sample_data
    (tmp_path / "text.jsonl").write_bytes(
        b'{"text": "fine"}\n'
        b'{"text": "bad \xff\xfe utf8"}\n'
        b"{not json}\n"
        b'{"body": "no text field"}\n'
        b'{"text": 42}\n'
        b"[1, 2]\n"
        b"\n"
        b'{"text": "also fine"}\n'
    )
    pq.write_table(pa.table({"content": ["x", "y"]}), tmp_path / "wrong_schema.parquet")
    (tmp_path / "not_really.parquet").write_bytes(b"PAR1 but not a parquet file")
    rows = [
        {"texts": ["a", None], "images": [None], "metadata": None},
        {"texts": [None, "b"], "images": ["https://example.com/cat.jpg", None], "metadata": None},
        {"texts": ["a", "b"], "images": ["local.jpg", None], "metadata": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "obelics.parquet")
    tar_bytes = (out / "image_text" / "00000.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(tar_bytes[: len(tar_bytes) // 2])
    with tarfile.open(tmp_path / "nocaption.tar", "w") as tar:
        info = tarfile.TarInfo("k1.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "sft.jsonl").write_text(
        json.dumps({"prompt": "hi", "answer": [{"text": "a", "image": "x.jpg"}]}) + "\n"
        + json.dumps({"prompt": "hi", "answer": "ok", "category": "poetry"}) + "\n"
        + json.dumps({"prompt": "hi", "answer": "ok"}) + "\n"
    )  # fmt: skip
    return tmp_path


def reasons(rejects: list[Reject]) -> list[str]:
    return [r.reason for r in rejects]


def test_broken_jsonl_lines_are_counted_rejects(broken: Path) -> None:
    records, rejects = read_all(source("t", "text", "jsonl", broken / "text.jsonl"))
    assert [r["text"] for r in records] == ["fine", "also fine"]
    assert reasons(rejects) == ["invalid_utf8", "bad_json", "bad_record", "bad_record", "bad_record"]
    assert rejects[0].record_id == "text.jsonl:17"  # the byte offset of the line
    assert "missing field 'text'" in rejects[2].detail and "should be a string, got int" in rejects[3].detail
    assert len(records) + len(rejects) == 7  # every non-blank line is accounted for


def test_broken_parquet_files(broken: Path) -> None:
    records, rejects = read_all(source("t", "text", "parquet", broken / "wrong_schema.parquet"))
    assert records == [] and reasons(rejects) == ["bad_record", "bad_record"]
    records, rejects = read_all(source("t", "text", "parquet", broken / "not_really.parquet"))
    assert records == [] and reasons(rejects) == ["file_unreadable"]
    assert str(broken / "not_really.parquet") in rejects[0].detail
    records, rejects = read_all(source("o", "interleaved", "parquet", broken / "obelics.parquet"))
    # Reading keeps an http(s) image as its URL: the download stage fetches it, or rejects it as image_not_local.
    assert [r["images"] for r in records] == [[{"bytes": None, "path": None, "url": "https://example.com/cat.jpg"}, None]]
    assert [(r.reason, r.detail) for r in rejects] == [
        ("bad_record", "texts has 2 entries but images has 1"),
        ("bad_record", "position 0: exactly one of texts/images must be set"),
    ]


def test_a_corrupt_row_group_is_one_reject_per_row_and_the_others_are_read(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(400)) for _ in range(300)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    first_page = column.dictionary_page_offset or column.data_page_offset
    data[first_page : first_page + 16] = b"\xff" * 16  # the second row group's first page header
    path.write_bytes(bytes(data))
    records, rejects = read_all(source("t", "text", "parquet", path))
    assert [r["text"] for r in records] == texts[:100] + texts[200:]
    assert reasons(rejects) == ["file_unreadable"] * 100  # rows = records + rejects, as the file's footer says
    assert [r.record_id.rsplit("#", 1)[1] for r in rejects] == [str(i) for i in range(100, 200)]
    assert "row group 1 unreadable" in rejects[0].detail


def test_truncated_tar_keeps_what_it_read_and_reports_the_file(broken: Path) -> None:
    records, rejects = read_all(source("p", "image_text", "webdataset", broken / "truncated.tar"))
    assert 0 < len(records) < 12
    assert reasons(rejects) == ["file_unreadable"] and "truncated.tar" in rejects[0].detail
    records, rejects = read_all(source("p", "image_text", "webdataset", broken / "nocaption.tar"))
    assert records == [] and reasons(rejects) == ["bad_record"] and rejects[0].record_id == "nocaption.tar/k1"


def test_broken_sft_pairs(broken: Path) -> None:
    records, rejects = read_all(source("s", "sft", "jsonl", broken / "sft.jsonl"))
    assert [r["category"] for r in records] == ["text"]
    assert reasons(rejects) == ["bad_record", "bad_record"]
    assert "answer[0] must set exactly one of text / image" in rejects[0].detail
    assert "unknown category 'poetry'" in rejects[1].detail


def test_image_text_parquet_layouts(sample_data, tmp_path: Path) -> None:
    out, _ = sample_data
    photos = sorted((out / "sft" / "images").glob("*.jpg"))[:3]
    # img2dataset's parquet output: jpg bytes and caption columns.
    pq.write_table(pa.table({"jpg": [p.read_bytes() for p in photos], "caption": ["a", "b", "c"]}),
                   tmp_path / "i2d.parquet")  # fmt: skip
    # Image-text parquet with local paths (relative to the file) and a Hugging Face image struct.
    (tmp_path / "imgs").mkdir()
    for p in photos:
        (tmp_path / "imgs" / p.name).write_bytes(p.read_bytes())
    rows = [{"image": {"bytes": None, "path": f"imgs/{p.name}"}, "text": f"photo {n}"} for n, p in enumerate(photos)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "paths.parquet")
    records, rejects = read_all(source("a", "image_text", "parquet", tmp_path / "i2d.parquet"))
    assert rejects == [] and [r["text"] for r in records] == ["a", "b", "c"]
    assert records[0]["image"]["bytes"] == photos[0].read_bytes()
    records, rejects = read_all(source("b", "image_text", "parquet", tmp_path / "paths.parquet"))
    assert rejects == [] and records[2]["image"]["path"] == str(tmp_path / "imgs" / photos[2].name)


def test_mmc4_jsonl_places_images_before_their_sentence(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "b.jpg").write_bytes(b"x")  # downloaded beside it: image_name wins over raw_url
    doc = {"text_list": ["First.", "Second.", "Third."],
           "image_info": [{"image_name": "b.jpg", "matched_text_index": 1, "raw_url": "http://x/b.jpg"},
                          {"image_name": "a.jpg", "matched_text_index": 0}]}  # fmt: skip
    bad = {"text_list": ["Only."], "image_info": [{"image_name": "c.jpg", "matched_text_index": 4}]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n" + json.dumps(bad) + "\n")
    src = source("m", "interleaved", "jsonl", tmp_path / "docs.jsonl", images_dir=str(tmp_path / "images"))
    records, rejects = read_all(src)
    assert records[0]["texts"] == [None, "First.", None, "Second.", "Third."]
    assert [im and Path(im["path"]).name for im in records[0]["images"]] == ["a.jpg", None, "b.jpg", None, None]
    assert reasons(rejects) == ["bad_record"] and "sentences that do not exist: [4]" in rejects[0].detail


def test_sft_parquet(tmp_path: Path) -> None:
    from schemas.records import SFT

    row = {"id": "x", "category": "visual_chat",
           "prompt": [{"text": None, "image": {"bytes": b"\xff\xd8", "path": None, "url": None}},
                      {"text": "What is it?", "image": None}],
           "answer": [{"text": "A cat.", "image": None}]}  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row], schema=SFT), tmp_path / "sft.parquet")
    records, rejects = read_all(source("s", "sft", "parquet", tmp_path / "sft.parquet"))
    assert rejects == [] and records[0]["prompt"][0]["image"]["bytes"] == b"\xff\xd8"
    assert records[0]["answer"] == [{"text": "A cat.", "image": None}]


def test_a_damaged_gzip_is_a_reject_not_a_crash(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "t.jsonl.gz"
    rng = random.Random(1)
    lines = "".join(
        json.dumps({"text": "".join(rng.choice("abcdefgh ") for _ in range(200))}) + "\n" for _ in range(50)
    )
    data = bytearray(gzip.compress(lines.encode()))
    data[200:260] = bytes(b ^ 0xFF for b in data[200:260])  # damage inside the deflate stream
    path.write_bytes(bytes(data))
    records, rejects = read_all(source("t", "text", "jsonl", path))
    assert reasons(rejects) == ["file_unreadable"] and str(path) in rejects[0].detail
    assert len(records) < 50  # what came before the damage, if anything
