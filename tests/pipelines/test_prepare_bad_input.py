"""The prepare job meets broken input in every format: it finishes, and records in = samples out + rejects."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.prepare_job import run_prepare
from schemas import PrepareConfig, validate_config
from tests.conftest import REPO

PHOTO = (REPO / "sample/images/tabby_cat_chelsea.jpg").read_bytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (a decompression bomb's header) and holds almost nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def tar_of(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def broken_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    png = encoded(Image.open(io.BytesIO(PHOTO)), "PNG")
    cmyk = encoded(Image.open(io.BytesIO(PHOTO)).convert("CMYK"), "JPEG")
    sixteen = encoded(Image.fromarray((np.arange(128 * 128).reshape(128, 128) * 4).astype(np.uint16)), "PNG")
    samples = [
        ("good", {"jpg": PHOTO, "txt": b"a cat"}),
        ("zero", {"jpg": b"", "txt": b"empty file"}),
        ("truncjpg", {"jpg": PHOTO[: len(PHOTO) // 3], "txt": b"cut jpeg"}),
        ("truncpng", {"png": png[: len(png) // 2], "txt": b"cut png"}),
        ("bomb", {"png": png_header_only(50_000, 50_000), "txt": b"50000 x 50000"}),
        ("notimage", {"jpg": b"this is text, not a JPEG" * 10, "txt": b"liar"}),
        ("cmyk", {"jpg": cmyk, "txt": b"cmyk cat"}),
        ("sixteen", {"png": sixteen, "txt": b"16-bit gradient"}),
        ("badcaption", {"jpg": PHOTO, "txt": b"\xff\xfe bad utf8"}),
        ("nocaption", {"jpg": PHOTO}),
    ]
    (root / "pairs").mkdir()
    tar_of(root / "pairs" / "00000.tar", samples)
    whole = tar_of(root / "whole.tar", samples[:4])
    (root / "pairs" / "00001.tar").write_bytes(whole.read_bytes()[:3000])  # a truncated tar
    (root / "text").mkdir()
    (root / "text" / "docs.jsonl").write_bytes(
        b'{"text": "A good document."}\n'
        b'{"text": "bad \xff utf8"}\n'
        b'{"text": ""}\n'
        b'{"text": "\\u0000\\u0001"}\n'
        b'{"content": "missing field"}\n'
        b'{"text": ["wrong", "type"]}\n'
        b"not json at all\n"
    )
    pq.write_table(pa.table({"body": ["wrong schema", "x"]}), root / "text" / "wrong.parquet")
    rows = [
        {"texts": ["Intro", None], "images": [None, {"bytes": PHOTO, "path": None, "url": None}], "metadata": None},
        {"texts": ["a", None, "b"], "images": [None, None], "metadata": None},
        {
            "texts": [None, "b"],
            "images": [{"bytes": None, "path": None, "url": "https://x.org/a.jpg"}, None],
            "metadata": None,
        },
        {"texts": [None], "images": [{"bytes": None, "path": "missing.jpg", "url": None}], "metadata": None},
    ]
    (root / "docs").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "docs" / "obelics.parquet")
    return root


def test_broken_input_is_counted_not_lost(broken_corpus: Path, tiny_tokenizers, tmp_path: Path) -> None:
    config = validate_config(
        PrepareConfig,
        {
            "output_dir": str(tmp_path / "out"),
            "image_size": 64,
            "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
            "sources": [
                {
                    "name": "pairs",
                    "kind": "image_text",
                    "format": "webdataset",
                    "paths": [str(broken_corpus / "pairs")],
                },
                {"name": "text", "kind": "text", "format": "jsonl", "paths": [str(broken_corpus / "text/*.jsonl")]},
                {"name": "wrongschema", "kind": "text", "format": "parquet", "paths": [str(broken_corpus / "text")]},
                {"name": "docs", "kind": "interleaved", "format": "parquet", "paths": [str(broken_corpus / "docs")]},
            ],
        },
    )
    result = run_prepare(config)
    totals = {name: m["totals"] for name, m in result["manifests"].items()}
    for name, t in totals.items():
        assert t["records_in"] == t["samples"] + t["rejects"], name
    # good + cmyk + sixteen convert; the rest of the first tar are rejects; the truncated tar is one reject
    # plus whatever samples it held before the cut.
    pairs = totals["pairs"]
    assert pairs["rejects_by_reason"]["image_empty"] == 1
    assert pairs["rejects_by_reason"]["image_truncated"] >= 2
    assert pairs["rejects_by_reason"]["image_too_large"] == 1
    assert pairs["rejects_by_reason"]["image_not_an_image"] == 1
    assert pairs["rejects_by_reason"]["invalid_utf8"] == 1
    assert pairs["rejects_by_reason"]["bad_record"] == 1
    assert pairs["rejects_by_reason"]["file_unreadable"] == 1
    assert pairs["samples"] >= 3
    assert totals["text"]["samples"] == 1
    assert totals["text"]["rejects_by_reason"] == {"bad_json": 1, "bad_record": 2, "empty_text": 2, "invalid_utf8": 1}
    assert totals["wrongschema"] == totals["wrongschema"] | {"samples": 0, "rejects": 2}
    assert totals["docs"]["samples"] == 1
    assert totals["docs"]["rejects_by_reason"] == {"bad_record": 1, "image_missing": 1, "image_not_local": 1}
    rejects = pq.read_table(tmp_path / "out/pairs/shard-00001.rejects.parquet").to_pylist()
    unreadable = [r for r in rejects if r["reason"] == "file_unreadable"]
    assert unreadable and str(broken_corpus / "pairs/00001.tar") in unreadable[0]["detail"]
    assert all(r["detail"] for r in rejects)


def test_one_odd_record_is_one_reject_and_the_rest_of_its_file_goes_on(tiny_tokenizers, tmp_path: Path) -> None:
    good = b'{"text": "A good document about lists and maps."}\n'
    lines = [
        b"\xef\xbb\xbf" + good,  # a UTF-8 byte-order mark before the first record
        b'{"text": "x", "n": ' + b"1" * 5000 + b"}\n",  # int too long for Python's str -> int conversion
        b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",  # nesting too deep for the JSON decoder
        *[good] * 5,
    ]
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.jsonl").write_bytes(b"".join(lines))
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(PHOTO)
    sft = [
        {"prompt": "What is it?", "answer": "A cat."},
        {"prompt": [{"image": {"bytes": "abc"}}, "What is it?"], "answer": "?"},  # bytes given as a str
        {"prompt": [{"image": "cat\u0000.jpg"}, "What is it?"], "answer": "?"},  # a NUL in the path
        {"prompt": [{"image": "cat.jpg"}, "What is it?"], "answer": "A cat."},
    ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    with gzip.open(tmp_path / "text" / "b.jsonl.gz", "wb") as f:  # read as it decompresses
        f.write(good * 3 + b"not json\n")
    config = validate_config(
        PrepareConfig,
        {
            "output_dir": str(tmp_path / "out"),
            "image_size": 64,
            "runner": {"kind": "embedded"},
            "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
            "sources": [
                {"name": "text", "kind": "text", "format": "jsonl", "paths": [str(tmp_path / "text")]},
                {"name": "sft", "kind": "sft", "format": "jsonl", "paths": [str(tmp_path / "sft.jsonl")]},
            ],
        },
    )
    result = run_prepare(config)  # finishes: no record can fail the job
    text, sft_totals = (result["manifests"][name]["totals"] for name in ("text", "sft"))
    # Every line is a sample or a reject; each file's good lines all came through.
    assert (text["samples"], text["rejects"]) == (6 + 3, 2 + 1)
    assert text["rejects_by_reason"] == {"bad_json": 3}
    assert (sft_totals["samples"], sft_totals["rejects"]) == (2, 2)
    assert sft_totals["rejects_by_reason"] == {"image_missing": 1, "unexpected_error": 1}


def test_a_rerun_with_fewer_shards_leaves_no_stale_ones(tiny_tokenizers, tmp_path: Path) -> None:
    docs = [
        json.dumps({"text": f"Document number {i}, about the lists and maps of everyday code."}) for i in range(400)
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(docs) + "\n")  # 30 KB: jsonl tasks hold at least 4 KB each

    def run(samples_per_shard: int) -> dict:
        return run_prepare(
            validate_config(
                PrepareConfig,
                {
                    "output_dir": str(tmp_path / "out"),
                    "image_size": 64,
                    "runner": {"kind": "embedded"},
                    "samples_per_shard": samples_per_shard,
                    "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
                    "sources": [{"name": "t", "kind": "text", "format": "jsonl", "paths": [str(tmp_path / "a.jsonl")]}],
                },
            )
        )

    assert len(run(5)["manifests"]["t"]["shards"]) > 2
    manifest = run(1000)["manifests"]["t"]
    assert len(manifest["shards"]) == 1 and manifest["totals"]["samples"] == 400
    assert sorted(p.name for p in (tmp_path / "out" / "t").glob("shard-*")) == [
        "shard-00000.attributes.parquet",
        "shard-00000.rejects.parquet",
        "shard-00000.stats.json",
        "shard-00000.tar",
    ]
