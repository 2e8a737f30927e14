"""Writing one output shard whole: the WebDataset tar, its attributes and rejects parquets, and last its stats file.

Files of shard N (`shard-NNNNN`):
- `.tar`: WebDataset, per sample (key `SOURCE_TASK_INDEX`): `npy` (token ids), `json` (source, kind, record_id,
  n_tokens, n_images, n_prompt_tokens, has_face, n_faces, image_sizes, category), `N.jpg` when images are written.
- `.attributes.parquet`: one row per sample in key order (schemas/records.py SAMPLE_ATTRIBUTES): the curation
  attributes a mixture filters on (faces, first image's width / height / aspect, text length, language, and the
  metadata columns the source's options.attributes names). A column store apart from the tokens, so that a mix
  with a new threshold reads a few small columns, never the tar.
- `.rejects.parquet`: the records that did not make it, with their reasons.
- `.stats.json`: counts and the fingerprint; written last, it marks the shard complete.

Each file is written under a temporary name and renamed (model/files/atomic.py), and the stats file (the
completion marker) comes last, so a killed job never leaves a shard that looks complete. Fixed mtimes and sorted
samples make the same input and config give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from model.files import storage
from model.files.atomic import atomic_path, write_atomic
from pipelines.raw_records import Reject
from schemas.records import REJECT, SAMPLE_ATTRIBUTES

TAR_MTIME = 0
STATS_SUFFIX = ".stats.json"
SHARD_IDS = "shard_ids.json"  # a source's read task -> shard id table: earlier builds' shards keep their ids
ATTRIBUTES_SUFFIX = ".attributes.parquet"
SHARD_SUFFIXES = (".tar", ".rejects.parquet", ATTRIBUTES_SUFFIX, STATS_SUFFIX)  # a shard's files, its marker last


@dataclass
class TokenizedSample:
    """One sample of a shard: its key (no dots), token ids, metadata, and optionally the normalized images."""

    key: str
    tokens: np.ndarray
    meta: dict[str, Any]
    images_jpg: list[bytes] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)  # curation attributes (pipelines/sample_attributes.py)


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


def shard_id_of(name: str) -> int | None:
    """The number of a shard name or file name (`shard-00012`, `shard-00012.tar`, ...); None if it is not one."""
    stem = name.split(".", 1)[0]
    number = stem[len("shard-") :] if stem.startswith("shard-") else ""
    return int(number) if number.isdigit() else None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Chameleon's 65,536 does), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def is_complete(
    out_dir: str | Path,
    shard_id: int,
    fingerprint: str,
    extra: dict[str, Any] | None = None,
    names: set[str] | None = None,
    stats_by_id: dict[int, dict[str, Any]] | None = None,
) -> bool:
    """A shard that needs no work: its stats file (written last) exists, holds the same config fingerprint, and the
    same values for the keys of `extra` that `write_shard` was given (the prepare job's read task); and it has its
    attributes file (a shard written before attributes were stored is written again, byte-identical but for it).
    `out_dir` may be a store URL; `names`, the folder's listing, and `stats_by_id`, its stats files parsed, if the
    caller has them (on a store: one listing and one batch, not requests a shard)."""
    attributes, stats_file = (shard_name(shard_id) + suffix for suffix in (ATTRIBUTES_SUFFIX, STATS_SUFFIX))
    if names is not None and not {attributes, stats_file} <= names:
        return False
    if names is None and not storage.exists(storage.join(out_dir, attributes)):
        return False
    if stats_by_id is not None:
        stats: Any = stats_by_id.get(shard_id)
    else:
        try:
            stats = json.loads(storage.read_text(storage.join(out_dir, stats_file)))
        except (OSError, ValueError):
            return False
    if not isinstance(stats, dict) or stats.get("fingerprint") != fingerprint:
        return False
    return all(stats.get(key) == value for key, value in (extra or {}).items())


def attributes_table(samples: Sequence[TokenizedSample]) -> pa.Table:
    """The attributes rows of `samples` (in their order): SAMPLE_ATTRIBUTES' columns, filled from a sample's
    metadata where its attributes lack one (has_face, face_count), then its metadata columns (float64, sorted)."""
    builtin = [f.name for f in SAMPLE_ATTRIBUTES]
    extra = sorted({name for s in samples for name in s.attributes} - set(builtin))
    rows = []
    for s in samples:
        row = {name: s.attributes.get(name) for name in builtin[1:]}
        row["has_face"] = int(bool(s.attributes.get("has_face", s.meta.get("has_face", False))))
        row["face_count"] = int(s.attributes.get("face_count", s.meta.get("n_faces", 0)))
        row["text_length"] = int(s.attributes.get("text_length") or 0)
        row |= {"key": s.key, "n_tokens": int(s.tokens.size), "n_images": int(s.meta.get("n_images", 0))}
        rows.append(row | {name: s.attributes.get(name) for name in extra})
    schema = pa.schema([*SAMPLE_ATTRIBUTES, *(pa.field(name, pa.float64()) for name in extra)])
    return pa.Table.from_pylist(rows, schema=schema)


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the hidden temporaries (`.NAME....tmp`, model.files.atomic) that killed writers left in a shard
    folder: each writer's are named uniquely, so a re-run never overwrites them. Only while no writer works there. A
    folder on a store has none (each object is put whole)."""
    if storage.is_url(folder):
        return []
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp"))
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def write_shard(
    out_dir: str | Path,
    shard_id: int,
    samples: Sequence[TokenizedSample],
    rejects: Sequence[Reject],
    *,
    vocab_size: int,
    fingerprint: str,
    records_in: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write shard `shard_id` under `out_dir` and return its stats (also written, last, as the marker). On a store
    (`out_dir` a URL) the files are written in a local temporary folder, then each is put whole (one PUT: an object
    appears complete or not at all), the stats last."""
    if storage.is_url(out_dir):
        with tempfile.TemporaryDirectory(prefix="cham-shard-") as folder:
            stats = write_shard(
                Path(folder),
                shard_id,
                samples,
                rejects,
                vocab_size=vocab_size,
                fingerprint=fingerprint,
                records_in=records_in,
                extra=extra,
            )
            for suffix in SHARD_SUFFIXES:  # the stats file last
                name = shard_name(shard_id) + suffix
                storage.upload(Path(folder) / name, storage.join(out_dir, name))
        return stats
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = shard_name(shard_id)
    dtype = token_dtype(vocab_size)
    samples = sorted(samples, key=lambda s: s.key)
    # The data files are renamed into place only once all are written (model.files.atomic), the stats last.
    with (
        atomic_path(out_dir / f"{name}.tar") as tar_tmp,
        atomic_path(out_dir / f"{name}.rejects.parquet") as rej_tmp,
        atomic_path(out_dir / f"{name}{ATTRIBUTES_SUFFIX}") as attr_tmp,
    ):
        with wds.TarWriter(str(tar_tmp), mtime=TAR_MTIME) as sink:
            for sample in samples:
                if "." in sample.key:
                    raise ValueError(f"sample key {sample.key!r} has a dot; WebDataset would split it")
                if sample.tokens.size and int(sample.tokens.max()) >= vocab_size:
                    raise ValueError(f"sample {sample.key}: id {int(sample.tokens.max())} >= vocab size {vocab_size}")
                member = {
                    "__key__": sample.key,
                    "npy": encode_npy(sample.tokens.astype(dtype)),
                    "json": json.dumps(sample.meta, sort_keys=True).encode(),
                }
                for n, jpg in enumerate(sample.images_jpg):
                    member[f"{n}.jpg"] = jpg
                sink.write(member)
        rejects = sorted(rejects, key=lambda r: (r.record_id, r.stage, r.reason))
        pq.write_table(pa.Table.from_pylist([r.as_row() for r in rejects], schema=REJECT), rej_tmp)
        pq.write_table(attributes_table(samples), attr_tmp)
    stats = {
        "shard": name,
        "fingerprint": fingerprint,
        "samples": len(samples),
        "tokens": int(sum(s.tokens.size for s in samples)),
        "images": int(sum(s.meta.get("n_images", 0) for s in samples)),
        "faces": int(sum(bool(s.meta.get("has_face")) for s in samples)),
        "rejects": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
        "records_in": records_in if records_in is not None else len(samples) + len(rejects),
        "token_dtype": dtype.name,
        **(extra or {}),
    }
    write_atomic(out_dir / f"{name}{STATS_SUFFIX}", json.dumps(stats, indent=2, sort_keys=True))  # last: complete
    return stats


def shard_samples(location: str | Path) -> Iterator[dict[str, Any]]:
    """The samples of a shard tar as webdataset groups them (`__key__` and a member's bytes by its extension),
    streamed from disk or from a store (read in blocks, never whole)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with storage.open_file(location) as f:
        yield from group_by_keys({**member, "__url__": str(location)} for member in tar_file_iterator(f))


def read_shard(tar: Path) -> list[dict[str, Any]]:
    """All samples of a shard as {key, tokens, meta, images_jpg} (for tests, inspection and the mix job)."""
    out = []
    for sample in wds.WebDataset(str(tar), shardshuffle=False):
        tokens = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        jpgs = [sample[k] for k in sorted(k for k in sample if k.endswith(".jpg"))]
        out.append({"key": sample["__key__"], "tokens": tokens, "meta": json.loads(sample["json"]), "images_jpg": jpgs})
    return out
