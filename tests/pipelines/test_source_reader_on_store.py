"""Readers on an object store (a real S3 API: moto's server on 127.0.0.1): the job's workers list, split and read
inputs there themselves, and get the records the same files give on disk; bad input there is a counted reject."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path
from typing import Any

import fsspec
import pytest

from pipelines.prepare_job import task_signature
from pipelines.source_reader import plan_read_tasks
from schemas.prepare_config import SourceConfig
from schemas.source_files import source_files
from tests.pipelines.test_source_reader import read_all


def source(kind: str, fmt: str, *paths: str, **options) -> SourceConfig:
    return SourceConfig(name="s", kind=kind, format=fmt, paths=list(paths), options=options)


def with_image_bytes(value: Any) -> Any:
    """A record with every image reference as its bytes (a local file's read here; a store's were read by the
    reader), so records read on disk and on the store compare."""
    if isinstance(value, dict) and set(value) == {"bytes", "path", "url"}:
        return value["bytes"] if value["bytes"] is not None else Path(value["path"]).read_bytes()
    if isinstance(value, dict):
        return {k: with_image_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [with_image_bytes(v) for v in value]
    return value


@pytest.fixture()
def raw_on_store(sample_data, s3_bucket: str) -> tuple[Path, str, Any]:
    raw = sample_data[0]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for part in ("text", "image_text", "interleaved", "sft"):
        fs.put(str(raw / part), f"{s3_bucket}/raw/{part}", recursive=True)
    return raw, f"{s3_bucket}/raw", fs


@pytest.mark.parametrize(
    ("kind", "fmt", "pattern", "split"),
    [
        ("text", "jsonl", "text/*.jsonl", {"jsonl_split_bytes": 997}),  # byte ranges, a line at each cut
        ("text", "parquet", "text/*.parquet", {"parquet_split_rows": 1}),
        ("image_text", "webdataset", "image_text", {}),
        ("interleaved", "parquet", "interleaved", {}),
        ("sft", "jsonl", "sft/pairs.jsonl", {}),  # images by relative path: beside it on the store
    ],
)
def test_a_source_on_the_store_reads_as_the_same_files_on_disk(raw_on_store, kind, fmt, pattern, split) -> None:
    raw, url, _ = raw_on_store
    local, local_rejects = read_all(source(kind, fmt, str(raw / pattern)), **split)
    remote, remote_rejects = read_all(source(kind, fmt, f"{url}/{pattern}"), **split)
    assert local and (local_rejects, remote_rejects) == ([], [])
    assert [r["id"] for r in remote] == [r["id"] for r in local]  # ids relative to the files' common folder
    assert with_image_bytes(remote) == with_image_bytes(local)
    tasks = plan_read_tasks(source(kind, fmt, f"{url}/{pattern}"), **split)
    assert all(t.path.startswith("s3://") for t in tasks)  # the workers open the objects, nothing is copied


def test_compressed_jsonl_and_listing_on_the_store(raw_on_store, tmp_path: Path) -> None:
    raw, url, fs = raw_on_store
    lines = (raw / "text").glob("*.jsonl")
    text = b"".join(p.read_bytes() for p in sorted(lines))
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(text))
    with zipfile.ZipFile(tmp_path / "docs.jsonl.zip", "w") as archive:
        archive.writestr("docs.jsonl", text)
    fs.put_file(str(tmp_path / "docs.jsonl.gz"), f"{url}/packed/docs.jsonl.gz")
    fs.put_file(str(tmp_path / "docs.jsonl.zip"), f"{url}/packed/a/docs.jsonl.zip")
    fs.pipe_file(f"{url}/packed/.hidden.jsonl", b'{"text": "a hidden file is not an input"}\n')
    fs.pipe_file(f"{url}/packed/notes.txt", b"not jsonl")
    files = source_files([f"{url}/packed"], "jsonl")  # a folder: its objects at any depth, of the format, no hidden
    assert files == [f"{url}/packed/a/docs.jsonl.zip", f"{url}/packed/docs.jsonl.gz"]
    assert source_files([f"{url}/packed/*.gz"], "jsonl") == [f"{url}/packed/docs.jsonl.gz"]
    records, rejects = read_all(source("text", "jsonl", f"{url}/packed"))
    whole = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    assert rejects == [] and [r["text"] for r in records] == whole + whole
    with pytest.raises(FileNotFoundError, match="input not found"):
        source_files([f"{url}/nothing/*.jsonl"], "jsonl")
    with pytest.raises(FileNotFoundError, match="no jsonl file"):
        source_files([f"{url}/packed/*.txt"], "jsonl")


def test_bad_input_on_the_store_is_a_counted_reject(raw_on_store) -> None:
    _, url, fs = raw_on_store
    pair = {"prompt": [{"text": "what is this?"}, {"image": "gone.jpg"}], "answer": "a picture"}
    fs.pipe_file(f"{url}/bad/pairs.jsonl", (json.dumps(pair) + "\n").encode() + b"{not json\n")
    fs.pipe_file(f"{url}/bad/cut.tar", fs.cat_file(fs.glob(f"{url}/image_text/*.tar")[0])[:3000])
    records, rejects = read_all(source("sft", "jsonl", f"{url}/bad/pairs.jsonl"))
    assert records == [] and [r.reason for r in rejects] == ["image_missing", "bad_json"]
    assert f"no image file at {url}/bad/gone.jpg" in rejects[0].detail
    records, rejects = read_all(source("image_text", "webdataset", f"{url}/bad/cut.tar"))
    assert [r.reason for r in rejects][-1] == "file_unreadable" and "cut.tar" in rejects[-1].detail


def test_a_changed_object_is_a_new_read_task(raw_on_store) -> None:
    _, url, fs = raw_on_store
    fs.pipe_file(f"{url}/grow/a.jsonl", b'{"text": "one"}\n')
    (task,) = plan_read_tasks(source("text", "jsonl", f"{url}/grow/a.jsonl"))
    before = task_signature(task)
    fs.pipe_file(f"{url}/grow/a.jsonl", b'{"text": "two"}\n')  # the same size and name, another ETag
    (task,) = plan_read_tasks(source("text", "jsonl", f"{url}/grow/a.jsonl"))  # the next build lists afresh
    after = task_signature(task)
    assert before[:4] == after[:4] == [f"{url}/grow/a.jsonl", 0, 16, 16] and before[4] != after[4]
