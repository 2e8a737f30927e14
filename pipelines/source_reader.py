"""Reading a source in splits: plan read tasks (byte ranges of jsonl, row groups of parquet, whole tars), then
read each task into canonical records and rejects.

Large files are never loaded whole: a jsonl file is cut into byte ranges (a line belongs to the range where it
starts), a parquet file into groups of row groups. Record ids say where a record came from
(`file:byte offset`, `file#row`, `file/key`), so they are stable and point back at the input.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.raw_records import (
    RecordError,
    Reject,
    image_text_record,
    mmc4_record,
    obelics_record,
    sft_record,
    text_record,
)
from schemas.config_base import expand_paths
from schemas.prepare_config import SourceConfig

JSONL_SPLIT_BYTES = 64 << 20
PARQUET_SPLIT_ROWS = 50_000
READ_STAGE = "read"


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading work: a byte range of a jsonl file, a run of row groups, or a whole tar."""

    source: str
    kind: str
    format: str
    path: str
    root: str  # record ids are relative to this folder
    start: int = 0
    stop: int = -1  # exclusive; -1: to the end
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def location(self) -> str:
        return os.path.relpath(self.path, self.root)


def plan_read_tasks(
    source: SourceConfig,
    records_per_task: int | None = None,
    jsonl_split_bytes: int = JSONL_SPLIT_BYTES,
    parquet_split_rows: int = PARQUET_SPLIT_ROWS,
) -> list[ReadTask]:
    """Cut a source's files into read tasks, in a stable order.

    With `records_per_task`, tasks hold about that many records (jsonl ranges sized from the file's average line
    length, runs of parquet row groups), so that one task can become one output shard. A parquet file that
    cannot even be opened becomes one task whose reading reports it.
    """
    files = [p for p in expand_paths(source.paths) if _belongs(p, source.format)]
    root = os.path.commonpath([str(p.parent) for p in files]) if files else "/"

    def task(path: Path, start: int = 0, stop: int = -1) -> ReadTask:
        return ReadTask(source.name, source.kind, source.format, str(path), root, start, stop, dict(source.options))

    tasks = []
    for path in files:
        if source.format == "jsonl" and path.name.endswith(".gz"):
            tasks.append(task(path))  # a gzip stream cannot be entered mid-way: one task per file
        elif source.format == "jsonl":
            size = path.stat().st_size
            step = jsonl_split_bytes if records_per_task is None else _bytes_per_records(path, records_per_task)
            tasks += [task(path, s, min(s + step, size)) for s in range(0, max(size, 1), step)]
        elif source.format == "parquet":
            rows = parquet_split_rows if records_per_task is None else records_per_task
            tasks += [task(path, a, b) for a, b in _row_group_runs(path, rows)]
        else:
            tasks.append(task(path))
    return tasks


def _bytes_per_records(path: Path, records: int, sample_bytes: int = 1 << 20) -> int:
    """Bytes that hold about `records` lines, from the average line length of the file's first megabyte."""
    with open(path, "rb") as f:
        head = f.read(sample_bytes)
    lines = max(1, head.count(b"\n"))
    return max(4096, len(head) * records // lines)


def _belongs(path: Path, fmt: str) -> bool:
    # Folders hold sidecars (img2dataset writes .parquet and _stats.json beside each .tar): read only our format.
    suffixes = {"jsonl": (".jsonl", ".json", ".jsonl.gz"), "parquet": (".parquet",), "webdataset": (".tar",)}
    return path.name.endswith(suffixes[fmt])


def _row_group_runs(path: Path, max_rows: int) -> list[tuple[int, int]]:
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # any failure means the file is unreadable; its read task reports it
        return [(0, -1)]
    runs, start, rows = [], 0, 0
    for i in range(meta.num_row_groups):
        rows += meta.row_group(i).num_rows
        if rows >= max_rows:
            runs.append((start, i + 1))
            start, rows = i + 1, 0
    if start < meta.num_row_groups or not runs:
        runs.append((start, meta.num_row_groups))
    return runs


def read_task(task: ReadTask) -> Iterator[dict[str, Any] | Reject]:
    """Records (dicts of the kind's schema) and rejects of one task; a file that cannot be read is one reject."""
    reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "webdataset": _read_tar}[task.format]
    try:
        yield from reader(task)
    except (OSError, tarfile.TarError, ValueError, EOFError, zlib.error) as err:  # zlib: a damaged .gz
        # The whole file (or the rest of it) is unreadable: report the path, don't kill the job.
        yield Reject(task.source, task.location(), READ_STAGE, "file_unreadable", f"{task.path}: {err}")


def _to_record(task: ReadTask, row: Any, record_id: str) -> dict[str, Any] | Reject:
    base_dir = Path(task.path).parent
    try:
        if not isinstance(row, dict):
            raise RecordError("bad_record", f"expected an object, got {type(row).__name__}")
        if task.kind == "text":
            return text_record(row, record_id, task.options)
        if task.kind == "image_text":
            return image_text_record(row, record_id, task.options, base_dir)
        if task.kind == "interleaved":
            if task.format == "jsonl":
                return mmc4_record(row, record_id, task.options, base_dir)
            return obelics_record(row, record_id, base_dir)
        return sft_record(row, record_id, base_dir)
    except RecordError as err:
        return Reject(task.source, record_id, READ_STAGE, err.reason, err.detail)
    except Exception as err:  # one odd record is one counted reject; it must not end the file's other records
        return Reject(task.source, record_id, READ_STAGE, "unexpected_error", f"{type(err).__name__}: {err}"[:500])


def _read_jsonl(task: ReadTask) -> Iterator[dict[str, Any] | Reject]:
    # .jsonl.gz: decompressed as it streams (record ids then hold offsets into the decompressed text).
    with gzip.open(task.path, "rb") if task.path.endswith(".gz") else open(task.path, "rb") as f:
        offset = task.start
        if offset:
            # The line that straddles our start belongs to the previous range.
            f.seek(offset - 1)
            offset += len(f.readline()) - 1
        stop = task.stop if task.stop >= 0 else float("inf")
        while offset < stop:
            line = f.readline()
            if not line:
                break
            if offset == 0 and line.startswith(codecs.BOM_UTF8):  # a UTF-8 byte-order mark before the first record
                line, offset = line[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            record_id = f"{task.location()}:{offset}"
            offset += len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield Reject(task.source, record_id, READ_STAGE, "invalid_utf8", f"{err.reason} at byte {err.start}")
                continue
            except json.JSONDecodeError as err:
                yield Reject(task.source, record_id, READ_STAGE, "bad_json", f"{err.msg} at column {err.colno}")
                continue
            except (ValueError, RecursionError) as err:  # e.g. an integer of over 4,300 digits, nesting too deep
                yield Reject(task.source, record_id, READ_STAGE, "bad_json", f"{type(err).__name__}: {err}"[:500])
                continue
            yield _to_record(task, row, record_id)


def _read_parquet(task: ReadTask) -> Iterator[dict[str, Any] | Reject]:
    parquet = pq.ParquetFile(task.path)
    stop = parquet.metadata.num_row_groups if task.stop < 0 else task.stop
    row_index = sum(parquet.metadata.row_group(i).num_rows for i in range(task.start))
    for group in range(task.start, stop):
        try:
            rows = parquet.read_row_group(group).to_pylist()
        except (OSError, ValueError, pa.ArrowException) as err:
            # A corrupt row group: each of its rows (their count is in the footer) is one reject, and the file's
            # other row groups are still read.
            n_rows = parquet.metadata.row_group(group).num_rows
            detail = f"{task.path}: row group {group} unreadable: {err}"[:500]
            for k in range(n_rows):
                yield Reject(task.source, f"{task.location()}#{row_index + k}", READ_STAGE, "file_unreadable", detail)
            row_index += n_rows
            continue
        for row in rows:
            yield _to_record(task, row, f"{task.location()}#{row_index}")
            row_index += 1


def _read_tar(task: ReadTask) -> Iterator[dict[str, Any] | Reject]:
    """WebDataset samples (members grouped by key) of one tar, streamed; a truncated tar ends in one reject."""
    sample: dict[str, Any] = {}
    key = None
    with tarfile.open(task.path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base, _, ext = os.path.basename(member.name).partition(".")
            member_key = os.path.join(os.path.dirname(member.name), base)
            if key is not None and member_key != key:
                yield _sample_record(task, key, sample)
                sample = {}
            key = member_key
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            sample[ext.lower()] = data
    if key is not None:
        yield _sample_record(task, key, sample)


def _sample_record(task: ReadTask, key: str, sample: dict[str, Any]) -> dict[str, Any] | Reject:
    record_id = f"{task.location()}/{key}"
    row: dict[str, Any] = dict(sample)
    if "json" in row:
        try:
            row["json"] = json.loads(row["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return Reject(task.source, record_id, READ_STAGE, "bad_json", f"{key}.json: {err}")
    return _to_record(task, row, record_id)
