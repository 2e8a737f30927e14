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
        json.dumps({"prompt": "hi", "answer": [{"text": "a", "image": "x.jpg"}]})
        + "\n"
        + json.dumps({"prompt": "hi", "answer": "ok", "category": "poetry"})
        + "\n"
        + json.dumps({"prompt": "hi", "answer": "ok"})
        + "\n"
    )
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
    assert [r["images"] for r in records] == [
        [{"bytes": None, "path": None, "url": "https://example.com/cat.jpg"}, None]
    ]
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
    pq.write_table(
        pa.table({"jpg": [p.read_bytes() for p in photos], "caption": ["a", "b", "c"]}), tmp_path / "i2d.parquet"
    )
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
    doc = {
        "text_list": ["First.", "Second.", "Third."],
        "image_info": [
            {"image_name": "b.jpg", "matched_text_index": 1, "raw_url": "http://x/b.jpg"},
            {"image_name": "a.jpg", "matched_text_index": 0},
        ],
    }
    bad = {"text_list": ["Only."], "image_info": [{"image_name": "c.jpg", "matched_text_index": 4}]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n" + json.dumps(bad) + "\n")
    src = source("m", "interleaved", "jsonl", tmp_path / "docs.jsonl", images_dir=str(tmp_path / "images"))
    records, rejects = read_all(src)
    assert records[0]["texts"] == [None, "First.", None, "Second.", "Third."]
    assert [im and Path(im["path"]).name for im in records[0]["images"]] == ["a.jpg", None, "b.jpg", None, None]
    assert reasons(rejects) == ["bad_record"] and "sentences that do not exist: [4]" in rejects[0].detail


def test_sft_parquet(tmp_path: Path) -> None:
    from schemas.records import SFT

    row = {
        "id": "x",
        "category": "visual_chat",
        "prompt": [
            {"text": None, "image": {"bytes": b"\xff\xd8", "path": None, "url": None}},
            {"text": "What is it?", "image": None},
        ],
        "answer": [{"text": "A cat.", "image": None}],
    }
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


# --- upstream formats and hostile inputs (issue 17) -------------------------------------------------------------


def write_mmc4_zip(path: Path, docs: list[dict]) -> Path:
    """An MMC4 shard as published: `docs_shard_N_v2.jsonl.zip` holding one jsonl of documents."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(path.name.removesuffix(".zip"), "".join(json.dumps(d) + "\n" for d in docs))
    return path


def mmc4_doc(sentences: list[str], images: dict[int, str]) -> dict:
    """A document with MMC4's fields: text_list, image_info (image_name, raw_url, matched_text_index,
    matched_sim, face_detections), similarity_matrix, url, could_have_url_duplicate."""
    infos = [
        {
            "image_name": name,
            "raw_url": f"https://example.com/{name}",
            "matched_text_index": index,
            "matched_sim": 0.3,
            "face_detections": None,
        }
        for index, name in images.items()
    ]
    return {
        "text_list": sentences,
        "image_info": infos,
        "url": "https://example.com/doc",
        "similarity_matrix": [[0.1] * len(sentences) for _ in infos],
        "could_have_url_duplicate": 0,
    }


def test_mmc4_zip_shards_are_read_as_shipped(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"jpg")
    docs = [mmc4_doc(["One sentence.", "Another one."], {1: "a.jpg"}), mmc4_doc(["Alone."], {})]
    write_mmc4_zip(tmp_path / "docs_shard_7_v2.jsonl.zip", docs)
    records, rejects = read_all(source("m", "interleaved", "jsonl", tmp_path))
    assert rejects == [] and [r["id"] for r in records] == [
        "docs_shard_7_v2.jsonl.zip:0",
        f"docs_shard_7_v2.jsonl.zip:{len(json.dumps(docs[0])) + 1}",
    ]
    assert records[0]["texts"] == ["One sentence.", None, "Another one."]
    assert records[0]["images"][1]["path"] == str(tmp_path / "a.jpg")


def test_a_zip_without_jsonl_or_a_broken_zip_is_a_counted_reject(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.jsonl.zip", "w") as archive:
        archive.writestr("readme.txt", "no documents here")
    (tmp_path / "broken.jsonl.zip").write_bytes(b"PK\x03\x04 and then nothing")
    _, rejects = read_all(source("m", "interleaved", "jsonl", tmp_path))
    assert [(r.record_id, r.reason) for r in rejects] == [
        ("broken.jsonl.zip", "file_unreadable"),
        ("other.jsonl.zip", "file_unreadable"),
    ]


def test_a_file_named_explicitly_must_be_of_the_format(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl.bz2").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("{}")
    for name in ("docs.jsonl.bz2", "notes.txt"):
        with pytest.raises(ValueError, match=rf"{name} is not a jsonl file; jsonl sources read \.jsonl"):
            source("m", "text", "jsonl", tmp_path / name)
    with pytest.raises(ValueError, match=r"no jsonl file .* found at"):  # a folder with nothing of the format
        source("m", "text", "jsonl", tmp_path)


def test_a_directory_link_loop_lists_each_file_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.jsonl").write_text('{"text": "first"}\n')
    (data / "sub" / "b.jsonl").write_text('{"text": "second"}\n')
    (data / "sub" / "loop").symlink_to(data, target_is_directory=True)  # sub/loop -> data: a cycle
    (data / "sub" / "loop2").symlink_to(data / "sub", target_is_directory=True)  # two cycles: 2^40 paths to glob.glob
    (tmp_path / "again").symlink_to(data, target_is_directory=True)  # a second way into the same files
    for paths in ([f"{data}/**/*.jsonl"], [str(data)], [f"{data}/**/*.jsonl", f"{tmp_path}/again/*.jsonl"]):
        records, rejects = read_all(SourceConfig(name="t", kind="text", format="jsonl", paths=paths))
        assert (sorted(r["text"] for r in records), rejects) == (["first", "second"], []), paths


def test_a_dangling_link_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "kept"}\n')
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    for pattern in (f"{tmp_path}/*.jsonl", str(tmp_path)):
        records, rejects = read_all(source("t", "text", "jsonl", pattern))
        assert [r["text"] for r in records] == ["kept"]
        assert [(r.record_id, r.reason) for r in rejects] == [("gone.jsonl", "file_unreadable")]
        assert "deleted.jsonl" in rejects[0].detail


def _peak_memory_of(code: str) -> int:
    """Peak Python allocations (tracemalloc, bytes) of `code` run in a fresh interpreter, after the reader's imports."""
    import subprocess
    import sys

    imports = "import pipelines.source_reader, schemas.prepare_config, tracemalloc"
    script = f"{imports}\ntracemalloc.start()\n{code}\nprint(tracemalloc.get_traced_memory()[1])"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return int(done.stdout.split()[-1])


def test_a_huge_gzip_line_is_rejected_without_being_held(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "bomb.jsonl.gz"
    huge = b'{"text": "' + b"a" * (129 << 20) + b'"}\n'
    with gzip.open(path, "wb", compresslevel=9) as f:  # 129 MiB of text in a file of about 130 kB
        f.write(b'{"text": "before"}\n' + huge + b'{"text": "after"}\n')
    del huge
    assert path.stat().st_size < 1 << 20
    code = f"""
from pipelines.source_reader import plan_read_tasks, read_task
from schemas.prepare_config import SourceConfig
src = SourceConfig(name="t", kind="text", format="jsonl", paths=[{str(path)!r}],
                   options={{"max_record_bytes": 1 << 20}})
items = [item for task in plan_read_tasks(src) for item in read_task(task)]
assert [getattr(i, "reason", None) or i["text"] for i in items] == ["before", "record_too_large", "after"], items
assert [getattr(i, "record_id", None) or i["id"] for i in items][2] == "bomb.jsonl.gz:{19 + (129 << 20) + 13}"
"""
    assert _peak_memory_of(code) < 16 << 20  # the whole line would be 129 MiB (and the old reader copied it 4x)


@pytest.mark.slow
def test_the_default_record_limit_bounds_a_huge_line(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(b'{"text": "' + b"a" * (129 << 20) + b'"}\n')
    code = f"""
from pipelines.source_reader import plan_read_tasks, read_task
from schemas.prepare_config import SourceConfig
src = SourceConfig(name="t", kind="text", format="jsonl", paths=[{str(path)!r}])
assert [i.reason for task in plan_read_tasks(src) for i in read_task(task)] == ["record_too_large"]
"""
    assert _peak_memory_of(code) < 100 << 20  # 32 MiB default limit, read in one bounded piece


def test_plain_jsonl_lines_and_range_starts_are_bounded_too(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = [b'{"text": "a"}\n', b'{"text": "' + b"b" * 5000 + b'"}\n', b'{"text": "c"}\n']
    path.write_bytes(b"".join(lines))
    src = source("t", "text", "jsonl", path, max_record_bytes=4096)
    for split in (1 << 20, 100, 4096):  # a range may start inside the long line
        records, rejects = read_all(src, jsonl_split_bytes=split)
        assert [r["text"] for r in records] == ["a", "c"], split
        assert [(r.record_id, r.reason) for r in rejects] == [(f"t.jsonl:{len(lines[0])}", "record_too_large")]


def test_oversized_tar_members_and_parquet_rows_are_rejected_before_reading(tmp_path: Path) -> None:
    jpg = (Path(__file__).resolve().parents[2] / "sample" / "images").glob("*.jpg").__next__().read_bytes()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, image in (("small", jpg), ("big", jpg + b"\0" * 8192)):
            for ext, data in (("jpg", image), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    limit = len(jpg) + 4096
    records, rejects = read_all(source("w", "image_text", "webdataset", tmp_path / "00000.tar", max_record_bytes=limit))
    assert [r["id"] for r in records] == ["00000.tar/small"]
    assert [(r.record_id, r.reason) for r in rejects] == [("00000.tar/big", "record_too_large")]
    rows = [{"text": "short"}, {"text": "x" * 10_000}, {"text": "also short"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    records, rejects = read_all(source("p", "text", "parquet", tmp_path / "t.parquet", max_record_bytes=4096))
    assert [r["text"] for r in records] == ["short", "also short"]
    assert [(r.record_id, r.reason) for r in rejects] == [("t.parquet#1", "record_too_large")]
    # A row group whose uncompressed size (from the footer) is far over the limit is not read at all.
    pq.write_table(pa.Table.from_pylist([{"text": "y" * 300_000}] * 2), tmp_path / "g.parquet")
    records, rejects = read_all(source("g", "text", "parquet", tmp_path / "g.parquet", max_record_bytes=4096))
    assert records == [] and [r.reason for r in rejects] == ["record_too_large"] * 2
    assert "row group 0 holds" in rejects[0].detail


def test_a_tar_sample_with_two_members_of_one_extension_is_rejected(tmp_path: Path) -> None:
    jpg = (Path(__file__).resolve().parents[2] / "sample" / "images").glob("*.jpg").__next__().read_bytes()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        members = [
            ("k1.jpg", jpg),
            ("k1.txt", b"one"),
            ("k1.JPG", b"other"),
            ("k2.jpg", jpg),
            ("k2.txt", b"two"),
            ("k2.txt", b"two again"),
            ("k3.jpg", jpg),
            ("k3.txt", b"ok"),
        ]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records, rejects = read_all(source("w", "image_text", "webdataset", tmp_path / "00000.tar"))
    assert [r["id"] for r in records] == ["00000.tar/k3"]
    assert [(r.record_id, r.reason) for r in rejects] == [
        ("00000.tar/k1", "duplicate_member"),
        ("00000.tar/k2", "duplicate_member"),
    ]
    assert "k1.JPG: a second .jpg member" in rejects[0].detail
