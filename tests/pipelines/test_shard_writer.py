"""Shard writing: whole shards, stats last, byte-identical rewrites, completeness by fingerprint."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.raw_records import Reject
from pipelines.shard_writer import TokenizedSample, is_complete, read_shard, remove_temporaries, write_shard


def make_samples(n: int = 5) -> list[TokenizedSample]:
    rng = np.random.default_rng(0)
    return [
        TokenizedSample(
            key=f"photos_{i:06d}",
            tokens=rng.integers(0, 65_536, 20 + i).astype(np.int64),
            meta={"source": "photos", "n_images": 1, "has_face": i % 2 == 0, "n_tokens": 20 + i},
            images_jpg=[b"\xff\xd8fake%d" % i] if i == 0 else [],
        )
        for i in range(n)
    ]


REJECTS = [Reject("photos", "a.tar/k9", "image", "image_truncated", "image file is truncated")]


def test_write_and_read_back(tmp_path: Path) -> None:
    samples = make_samples()
    stats = write_shard(tmp_path, 3, samples, REJECTS, vocab_size=65_536, fingerprint="abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-00003.attributes.parquet",
        "shard-00003.rejects.parquet",
        "shard-00003.stats.json",
        "shard-00003.tar",
    ]
    assert (stats["samples"], stats["rejects"], stats["faces"], stats["records_in"]) == (5, 1, 3, 6)
    assert stats["rejects_by_reason"] == {"image_truncated": 1} and stats["token_dtype"] == "uint16"
    back = read_shard(tmp_path / "shard-00003.tar")
    assert [s["key"] for s in back] == [s.key for s in samples]
    for got, want in zip(back, samples, strict=True):
        assert got["tokens"].dtype == np.uint16 and (got["tokens"] == want.tokens).all()
        assert got["meta"] == want.meta and got["images_jpg"] == want.images_jpg
    rows = pq.read_table(tmp_path / "shard-00003.rejects.parquet").to_pylist()
    assert rows == [r.as_row() for r in REJECTS]


def test_same_input_any_order_gives_identical_bytes(tmp_path: Path) -> None:
    samples = make_samples()
    write_shard(tmp_path / "a", 0, samples, REJECTS, vocab_size=65_536, fingerprint="f")
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    write_shard(tmp_path / "b", 0, shuffled, REJECTS, vocab_size=65_536, fingerprint="f")
    for name in (
        "shard-00000.tar",
        "shard-00000.rejects.parquet",
        "shard-00000.attributes.parquet",
        "shard-00000.stats.json",
    ):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_completeness_is_stats_plus_fingerprint(tmp_path: Path) -> None:
    assert not is_complete(tmp_path, 0, "f")
    write_shard(tmp_path, 0, make_samples(1), [], vocab_size=65_536, fingerprint="f")
    assert is_complete(tmp_path, 0, "f") and not is_complete(tmp_path, 0, "other")
    (tmp_path / "shard-00000.stats.json").write_text("{truncated")
    assert not is_complete(tmp_path, 0, "f")
    (tmp_path / "shard-00000.stats.json").write_text("[]")
    assert not is_complete(tmp_path, 0, "f")


def test_completeness_also_checks_what_the_shard_was_written_with(tmp_path: Path) -> None:
    task = {"task": ["/raw/a.jsonl", 0, 40]}  # what the prepare job passes: the read task, as write_shard stored it
    assert not is_complete(tmp_path, 0, "f", task)
    write_shard(tmp_path, 0, make_samples(1), [], vocab_size=65_536, fingerprint="f", extra=task)
    assert is_complete(tmp_path, 0, "f", task) and is_complete(tmp_path, 0, "f")
    assert not is_complete(tmp_path, 0, "f", {"task": ["/raw/a.jsonl", 40, 80]})
    assert not is_complete(tmp_path, 0, "other", task)


def test_large_vocabularies_use_int32_and_bad_samples_fail(tmp_path: Path) -> None:
    sample = TokenizedSample("k", np.array([70_000, 1]), {})
    write_shard(tmp_path, 1, [sample], [], vocab_size=100_000, fingerprint="f")
    assert read_shard(tmp_path / "shard-00001.tar")[0]["tokens"].dtype == np.int32
    with pytest.raises(ValueError, match="has a dot"):
        write_shard(tmp_path, 2, [TokenizedSample("a.b", np.array([1]), {})], [], vocab_size=10, fingerprint="f")
    with pytest.raises(ValueError, match="id 70000 >= vocab size 65536"):
        write_shard(tmp_path, 2, [sample], [], vocab_size=65_536, fingerprint="f")
    assert not is_complete(tmp_path, 2, "f")
    assert sorted(p.name for p in tmp_path.iterdir() if "00002" in p.name) == []  # not even a temporary


def test_files_are_renamed_into_place_data_first_stats_last(tmp_path: Path, monkeypatch) -> None:
    renamed: list[str] = []
    real_replace = os.replace

    def replace(src, dst) -> None:
        assert Path(src).name.startswith(".") and Path(src).parent == Path(dst).parent  # a temporary beside it
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_shard(tmp_path, 4, make_samples(2), REJECTS, vocab_size=65_536, fingerprint="f")
    assert sorted(renamed[:3]) == ["shard-00004.attributes.parquet", "shard-00004.rejects.parquet", "shard-00004.tar"]
    assert renamed[3:] == ["shard-00004.stats.json"]  # last: the marker of a complete shard
    assert not list(tmp_path.glob(".*"))


def test_temporaries_left_by_killed_writers_are_removed(tmp_path: Path) -> None:
    write_shard(tmp_path, 0, make_samples(1), [], vocab_size=65_536, fingerprint="f")
    left = [tmp_path / ".shard-00001.tar.4242.abcd1234.tmp", tmp_path / ".manifest.json.tmp"]
    for path in left:
        path.write_bytes(b"half")
    (tmp_path / ".shard-00002.rejects.parquet.4242.0000ffff.tmp").mkdir()
    assert len(remove_temporaries(tmp_path)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-00000.attributes.parquet",
        "shard-00000.rejects.parquet",
        "shard-00000.stats.json",
        "shard-00000.tar",
    ]
    assert remove_temporaries(tmp_path / "absent") == []


def test_shard_id_of_reads_any_width() -> None:
    from pipelines.shard_writer import shard_id_of, shard_name

    assert [shard_id_of(n) for n in ("shard-00012.tar", "shard-100000.stats.json", shard_name(7))] == [12, 100000, 7]
    assert shard_id_of("manifest.json") is None and shard_id_of(".shard-00001.tar.tmp") is None
