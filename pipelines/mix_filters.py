"""Curation at mix time: a prepared source's samples kept by its filters (`aesthetic >= 6`, `0.9 <= aspect <= 1.1`),
read from the shards' attributes files (pipelines/shard_writer.py), never from the tokens.

A sample passes when every filter accepts it. A sample without the attribute (no image for `aspect`, no such value
in its metadata) is excluded and counted as `missing`. What each filter removed is counted in order: a sample is
charged to the first filter it fails.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from model.files import storage
from pipelines.mix_plan import MixPlanError, SampleRef
from pipelines.shard_writer import ATTRIBUTES_SUFFIX, shard_id_of
from schemas.mixture_spec import manifest_attributes
from schemas.sample_filters import BUILTIN_ATTRIBUTES, FilterError, SampleFilter, check_attributes, parse_filter


def read_attributes(
    source: str, folder: str | Path, shards: Sequence[str], names: Sequence[str]
) -> tuple[dict[tuple[int, str], dict[str, Any]], str]:
    """The named attributes of every sample of a prepared source, by (shard id, key), read column by column from
    its attributes files; and a digest of those files (the mixture fingerprint changes when the values do). A shard
    without its file (prepared before attributes were stored) is a MixPlanError saying how to add it."""
    values: dict[tuple[int, str], dict[str, Any]] = {}
    digest = hashlib.sha256()
    present = set(storage.list_names(folder))  # one listing (on a store: one request, not one a shard)
    for shard in shards:
        path = storage.join(folder, f"{shard}{ATTRIBUTES_SUFFIX}")
        if f"{shard}{ATTRIBUTES_SUFFIX}" not in present:
            raise MixPlanError(
                f"source {source!r}: {path} is missing: the source was prepared before sample attributes were "
                f"stored; run `cham prepare` again (it rewrites only those shards) to filter on them"
            )
        try:
            with storage.open_file(path) as f:
                data = f.read()  # a few small columns (the tokens are in the tar): read once, digested and parsed
            columns = pq.read_schema(pa.BufferReader(data)).names
            table = pq.read_table(pa.BufferReader(data), columns=["key", *(n for n in names if n in columns)])
        except (OSError, ValueError, pa.ArrowException) as err:
            raise MixPlanError(f"source {source!r}: {path} is damaged ({err}); re-run `cham prepare`") from None
        digest.update(data)
        shard_id = shard_id_of(shard)
        for row in table.to_pylist():
            key = row.pop("key")
            values[(shard_id, key)] = row  # type: ignore[index]
    return values, digest.hexdigest()[:16]


def source_attributes(folder: str | Path) -> list[str] | None:
    """The attributes a prepared source's samples have, from its manifest on disk or on a store (None if unreadable)."""
    try:
        return manifest_attributes(json.loads(storage.read_text(storage.join(folder, "manifest.json"))))
    except (OSError, ValueError):
        return None


def parsed_filters(source: str, folder: str | Path, filters: Sequence[str]) -> list[SampleFilter]:
    """The source's filters, parsed and checked against the attributes its samples have."""
    try:
        parsed = [parse_filter(text) for text in filters]
        available = source_attributes(folder) or list(BUILTIN_ATTRIBUTES)
        check_attributes(parsed, available, f"source {source!r}")
    except FilterError as err:
        raise MixPlanError(str(err)) from None
    return parsed


def apply_filters(
    samples: Sequence[SampleRef], filters: Sequence[SampleFilter], values: dict[tuple[int, str], dict[str, Any]]
) -> tuple[list[SampleRef], list[dict[str, Any]]]:
    """The samples every filter accepts (in their order), and per filter what it removed: samples and tokens, and
    of those how many lacked the attribute."""
    rows = [
        {"filter": f.text, "removed_samples": 0, "removed_tokens": 0, "missing_samples": 0, "missing_tokens": 0}
        for f in filters
    ]
    kept = []
    for sample in samples:
        attributes = values.get((sample.shard, sample.key))
        if attributes is None:
            raise MixPlanError(f"sample {sample.key} of shard {sample.shard} has no row in its attributes file")
        for f, row in zip(filters, rows, strict=True):
            value = attributes.get(f.attribute)
            if not f.accepts(value):
                row["removed_samples"] += 1
                row["removed_tokens"] += sample.n_tokens
                if value is None:
                    row["missing_samples"] += 1
                    row["missing_tokens"] += sample.n_tokens
                break
        else:
            kept.append(sample)
    return kept, rows
