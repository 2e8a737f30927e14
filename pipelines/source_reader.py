"""Reading a source in splits: plan read tasks (byte ranges of jsonl, row groups of parquet, whole tars), then
read each task into canonical records and rejects.

Large files are never loaded whole: a jsonl file is cut into byte ranges (a line belongs to the range where it
starts), a parquet file into groups of row groups. Record ids say where a record came from
(`file:byte offset`, `file#row`, `file/key`), so they are stable and point back at the input.

Every read is bounded before anything is decoded: a jsonl line, a tar member or a parquet row larger than the
source's `max_record_bytes` is skipped unread (its size comes from the tar header, the parquet footer and arrow's
buffers, or from reading the line in bounded pieces) and counted as `record_too_large`.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from model.files import storage
from pipelines.raw_records import (
    RecordError,
    Reject,
    image_text_record,
    mmc4_record,
    obelics_record,
    sft_record,
    text_record,
)
from pipelines.sample_attributes import metadata_attributes
from schemas.prepare_config import DEFAULT_MAX_RECORD_BYTES, ROW_GROUP_RECORDS, SourceConfig
from schemas.source_files import of_format, read_bounded_line, source_files

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
    # An object's [size, ETag] on a store, asked once a file when the tasks are planned (not once a task)
    identity: tuple[Any, ...] | None = field(default=None, hash=False, compare=False)

    def location(self) -> str:
        if storage.is_url(self.path):
            return self.path[len(self.root) :].lstrip("/")
        return os.path.relpath(self.path, self.root)

    def max_record_bytes(self) -> int:
        return int(self.options.get("max_record_bytes") or DEFAULT_MAX_RECORD_BYTES)


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
    files = [str(f) for f in source_files(source.paths, source.format)]
    root = common_folder(files)
    options = source.options.model_dump(mode="json", exclude_none=True)

    identity: tuple[Any, ...] | None = None

    def task(path: str, start: int = 0, stop: int = -1) -> ReadTask:
        return ReadTask(source.name, source.kind, source.format, path, root, start, stop, options, identity)

    tasks = []
    for path in files:
        identity = tuple(storage.identity(path)) if storage.is_url(path) else None
        if (identity[0] is None) if identity is not None else not Path(path).is_file():
            tasks.append(task(path))  # a dangling link, a file gone or unreadable: its read task reports it
        elif source.format == "jsonl" and path.lower().endswith((".gz", ".zip")):
            tasks.append(task(path))  # a compressed stream cannot be entered mid-way: one task per file
        elif source.format == "jsonl":
            size = identity[0] if identity is not None else Path(path).stat().st_size
            step = jsonl_split_bytes if records_per_task is None else _bytes_per_records(path, records_per_task)
            tasks += [task(path, s, min(s + step, size)) for s in range(0, max(size, 1), step)]
        elif source.format == "parquet":
            rows = parquet_split_rows if records_per_task is None else records_per_task
            tasks += [task(path, a, b) for a, b in _row_group_runs(path, rows)]
        else:
            tasks.append(task(path))
    return tasks


def common_folder(files: list[str]) -> str:
    """The deepest folder holding every file (local paths or URLs of one store): record ids are relative to it."""
    if not files:
        return "/"
    if not storage.is_url(files[0]):
        return os.path.commonpath([str(Path(f).parent) for f in files])
    protocol = files[0].split("://", 1)[0]
    folders = [storage.url_parent(f).split("://", 1)[1] for f in files]
    return f"{protocol}://{os.path.commonpath(folders)}"


def _bytes_per_records(path: str, records: int, sample_bytes: int = 1 << 20) -> int:
    """Bytes that hold about `records` lines, from the average line length of the file's first megabyte."""
    head = storage.read_head(path, sample_bytes - 1)
    lines = max(1, head.count(b"\n"))
    return max(4096, len(head) * records // lines)


def _row_group_runs(path: str, max_rows: int) -> list[tuple[int, int]]:
    try:
        with storage.open_file(path) as f:
            meta = pq.ParquetFile(f).metadata
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
    except (OSError, tarfile.TarError, zipfile.BadZipFile, ValueError, EOFError, zlib.error) as err:  # zlib: bad .gz
        # The whole file (or the rest of it) is unreadable: report the path, don't kill the job.
        detail = f"{task.path}: {err}"
        if os.path.islink(task.path) and not os.path.exists(task.path):
            detail = f"{task.path}: a symbolic link to {os.readlink(task.path)}, which does not exist"
        yield Reject(task.source, task.location(), READ_STAGE, "file_unreadable", detail)


def _to_record(task: ReadTask, row: Any, record_id: str) -> dict[str, Any] | Reject:
    record = _canonical(task, row, record_id)
    if task.options.get("attributes") and isinstance(record, dict):  # the metadata columns kept as attributes
        record["attributes"] = metadata_attributes(row, task.options["attributes"])
    return record


def _canonical(task: ReadTask, row: Any, record_id: str) -> dict[str, Any] | Reject:
    base_dir: Path | str = storage.url_parent(task.path) if storage.is_url(task.path) else Path(task.path).parent
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


def _jsonl_streams(task: ReadTask) -> Iterator[tuple[Any, str]]:
    """(binary stream, record id prefix) of a jsonl file: plain, gzip, or each jsonl member of a zip (MMC4 ships
    `docs_shard_N_v2.jsonl.zip`); compressed data is decompressed as it streams, never whole."""
    name = task.path.lower()
    if name.endswith(".zip"):
        with storage.open_file(task.path) as raw, zipfile.ZipFile(raw) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and of_format(m.filename, "jsonl")]
            if not members:
                raise ValueError(f"the zip holds no .jsonl or .json file: {archive.namelist()[:5]}")
            for member in members:
                prefix = task.location() if len(members) == 1 else f"{task.location()}/{member.filename}"
                with archive.open(member) as f:
                    yield f, prefix
    elif name.endswith(".gz"):
        with storage.open_file(task.path) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
            yield f, task.location()
    else:
        with storage.open_file(task.path) as f:
            yield f, task.location()


def _read_jsonl(task: ReadTask) -> Iterator[dict[str, Any] | Reject]:
    # Compressed files: record ids hold offsets into the decompressed text.
    limit = task.max_record_bytes()
    for f, prefix in _jsonl_streams(task):
        offset = task.start
        if offset:
            # The line that straddles our start belongs to the previous range.
            f.seek(offset - 1)
            offset += read_bounded_line(f, 0)[1] - 1
        stop = task.stop if task.stop >= 0 else float("inf")
        while offset < stop:
            line, size = read_bounded_line(f, limit)
            if not size:
                break
            record_id = f"{prefix}:{offset}"
            if line is None:
                offset += size
                yield Reject(
                    task.source,
                    record_id,
                    READ_STAGE,
                    "record_too_large",
                    f"a line of {size:,} bytes, limit {limit:,} (max_record_bytes)",
                )
                continue
            if offset == 0 and line.startswith(codecs.BOM_UTF8):  # a UTF-8 byte-order mark before the first record
                line, offset = line[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
                record_id = f"{prefix}:{offset}"
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
    with storage.open_file(task.path) as f:
        yield from _read_row_groups(task, pq.ParquetFile(f))


def _read_row_groups(task: ReadTask, parquet: pq.ParquetFile) -> Iterator[dict[str, Any] | Reject]:
    stop = parquet.metadata.num_row_groups if task.stop < 0 else task.stop
    row_index = sum(parquet.metadata.row_group(i).num_rows for i in range(task.start))
    limit = task.max_record_bytes()
    for group in range(task.start, stop):
        meta = parquet.metadata.row_group(group)
        n_rows = meta.num_rows
        location = f"{task.location()}#{{}}"
        if meta.total_byte_size > limit * ROW_GROUP_RECORDS:
            # Its uncompressed size, from the footer: too big to read at once. Each row is one counted reject.
            detail = (
                f"{task.path}: row group {group} holds {meta.total_byte_size:,} bytes uncompressed, limit "
                f"{limit * ROW_GROUP_RECORDS:,} ({ROW_GROUP_RECORDS} x max_record_bytes); write smaller row groups"
            )
            for k in range(n_rows):
                yield Reject(task.source, location.format(row_index + k), READ_STAGE, "record_too_large", detail)
            row_index += n_rows
            continue
        try:
            table = parquet.read_row_group(group)
        except (OSError, ValueError, pa.ArrowException) as err:
            # A corrupt row group: each of its rows (their count is in the footer) is one reject, and the file's
            # other row groups are still read.
            detail = f"{task.path}: row group {group} unreadable: {err}"[:500]
            for k in range(n_rows):
                yield Reject(task.source, location.format(row_index + k), READ_STAGE, "file_unreadable", detail)
            row_index += n_rows
            continue
        # Rows are sized from arrow's buffers before any becomes Python objects (only needed when the whole
        # group is over the limit).
        sizes = [table.slice(k, 1).nbytes for k in range(table.num_rows)] if table.nbytes > limit else None
        rows = table.to_pylist() if sizes is None else None
        for k in range(table.num_rows):
            record_id = location.format(row_index)
            row_index += 1
            if sizes is not None and sizes[k] > limit:
                yield Reject(
                    task.source,
                    record_id,
                    READ_STAGE,
                    "record_too_large",
                    f"a row of {sizes[k]:,} bytes, limit {limit:,} (max_record_bytes)",
                )
                continue
            yield _to_record(task, rows[k] if rows is not None else table.slice(k, 1).to_pylist()[0], record_id)


def _read_tar(task: ReadTask) -> Iterator[dict[str, Any] | Reject]:
    """WebDataset samples (members grouped by key) of one tar, streamed; a truncated tar ends in one reject."""
    sample: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []  # (reason, detail) that reject the current sample
    key = None
    limit = task.max_record_bytes()

    def finish() -> dict[str, Any] | Reject:
        if problems:
            reason, detail = problems[0]
            return Reject(task.source, f"{task.location()}/{key}", READ_STAGE, reason, detail)
        return _sample_record(task, key, sample)  # type: ignore[arg-type]

    with storage.open_file(task.path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base, _, ext = os.path.basename(member.name).partition(".")
            member_key = os.path.join(os.path.dirname(member.name), base)
            if key is not None and member_key != key:
                yield finish()
                sample, problems = {}, []
            key = member_key
            ext = ext.lower()
            if ext in sample:
                # webdataset raises on this; keeping one of the two silently would pick an image at random.
                problems.append(("duplicate_member", f"{member.name}: a second .{ext} member for key {base}"))
            elif member.size > limit:  # from the member's header, before reading it
                problems.append(
                    ("record_too_large", f"{member.name}: {member.size:,} bytes, limit {limit:,} (max_record_bytes)")
                )
                sample[ext] = None
            else:
                sample[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if key is not None:
        yield finish()


def _sample_record(task: ReadTask, key: str, sample: dict[str, Any]) -> dict[str, Any] | Reject:
    record_id = f"{task.location()}/{key}"
    row: dict[str, Any] = dict(sample)
    if "json" in row:
        try:
            row["json"] = json.loads(row["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return Reject(task.source, record_id, READ_STAGE, "bad_json", f"{key}.json: {err}")
    return _to_record(task, row, record_id)
