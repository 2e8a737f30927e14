"""Locations on disk and on a store (a real S3 API: moto's server on 127.0.0.1) behave alike: small files written
whole and read back, batched reads that leave out what is missing, file identities that change with the content,
bounded line reads, and local copies of store folders kept up to date."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from model.files import storage
from schemas.source_files import read_bounded_line


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path: Path) -> str | Path:
    if request.param == "local":
        return tmp_path / "folder"
    return f"{request.getfixturevalue('s3_bucket')}/folder"


def test_small_files_round_trip_and_list_fresh(folder) -> None:
    storage.write_text(storage.join(folder, "a.json"), '{"a": 1}')
    storage.write_bytes(storage.join(folder, "sub", "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(folder, "a.json")) == '{"a": 1}'
    assert storage.list_names(folder) == ["a.json", "sub"]
    storage.write_text(storage.join(folder, "c.json"), "{}")  # listed again at once (no stale listing cache)
    assert storage.list_names(folder) == ["a.json", "c.json", "sub"]
    assert storage.read_texts(folder, ["a.json", "missing.json", "c.json"]) == {"a.json": '{"a": 1}', "c.json": "{}"}
    storage.remove(storage.join(folder, "a.json"))
    assert storage.list_names(folder) == ["c.json", "sub"] and not storage.exists(storage.join(folder, "a.json"))


def test_identity_changes_with_the_content(folder) -> None:
    path = storage.join(folder, "data.jsonl")
    assert storage.identity(path) == [None, None]
    storage.write_bytes(path, b"one\n")
    first = storage.identity(path)
    storage.write_bytes(path, b"two\n")  # the same size
    second = storage.identity(path)
    assert first[0] == second[0] == 4 and first[1] != second[1]


def test_bounded_lines_read_from_a_store_object(folder) -> None:
    path = storage.join(folder, "lines.jsonl")
    storage.write_bytes(path, b"short\n" + b"x" * 5000 + b"\nlast\n")
    with storage.open_file(path) as f:
        assert read_bounded_line(f, 100) == (b"short\n", 6)
        assert read_bounded_line(f, 100) == (None, 5001)  # too long: consumed, never held whole
        assert read_bounded_line(f, 100) == (b"last\n", 5)
        f.seek(2)
        assert f.read(4) == b"ort\n"


def test_a_local_copy_of_a_store_folder_is_fetched_once_and_kept_up_to_date(
    s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("CHAM_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file(f"{s3_bucket}/tok/model.bin", b"weights")
    fs.pipe_file(f"{s3_bucket}/tok/sub/config.json", b"{}")
    copy = storage.local_copy(f"{s3_bucket}/tok", "tokenizers")
    assert (copy / "model.bin").read_bytes() == b"weights" and (copy / "sub" / "config.json").read_bytes() == b"{}"
    mtime = (copy / "model.bin").stat().st_mtime_ns
    assert storage.local_copy(f"{s3_bucket}/tok", "tokenizers") == copy
    assert (copy / "model.bin").stat().st_mtime_ns == mtime  # the same size: not fetched again
    fs.pipe_file(f"{s3_bucket}/tok/model.bin", b"new weights")
    assert (storage.local_copy(f"{s3_bucket}/tok", "tokenizers") / "model.bin").read_bytes() == b"new weights"
    one = storage.local_copy(f"{s3_bucket}/tok/model.bin", "tokenizers")  # a single object
    assert one.name == "model.bin" and one.read_bytes() == b"new weights"
    assert storage.local_copy(tmp_path, "tokenizers") == tmp_path  # a local path is used where it is
