"""Locations that may be object-store URLs: a local path is used as it is, `s3://`, `gs://`, `az://`, `hdfs://`
(any fsspec protocol) through fsspec, with each store's standard credentials (AWS_* variables or ~/.aws for S3 and
AWS_ENDPOINT_URL for an S3-compatible server, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*).

`file://` URLs are local paths. Downloads go to a temporary name beside their target and are renamed into place, so
a reader never sees half a file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from model.files.atomic import atomic_path

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: str | Path) -> bool:
    """Whether `location` names a store other than the local file system (`file://` is local)."""
    text = str(location)
    return bool(_URL.match(text)) and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    """A local location as a Path (`file://` stripped); URLs of stores are refused (ValueError)."""
    text = str(location)
    if is_url(text):
        raise ValueError(f"{text}: not a local path")
    return Path(text.removeprefix("file://"))


def join(base: str | Path, *parts: str) -> str | Path:
    """`base / part / ...`: a Path for a local base, a URL (joined with '/') for a store."""
    if not is_url(base):
        return local_path(base).joinpath(*parts)
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(location: str | Path) -> tuple[Any, str]:
    """The fsspec file system of `location` and the path within it. A protocol without its package installed
    (s3fs for s3://, gcsfs for gs://, adlfs for az://) raises ImportError naming the package."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(location))


def exists(location: str | Path) -> bool:
    """Whether a file or folder is at `location`."""
    if not is_url(location):
        return local_path(location).exists()
    fs, path = filesystem(location)
    return fs.exists(path)


def size(location: str | Path) -> int:
    """The size in bytes of the file at `location`."""
    if not is_url(location):
        return local_path(location).stat().st_size
    fs, path = filesystem(location)
    return int(fs.size(path))


def download(location: str | Path, target: Path, max_bytes: int | None = None) -> Path:
    """Copy the file at `location` to `target` (atomically: a temporary beside it, then renamed); a file larger than
    `max_bytes` is refused before any byte is read (ValueError)."""
    fs, path = filesystem(location)
    if max_bytes is not None:
        found = int(fs.size(path))
        if found > max_bytes:
            raise ValueError(f"{location}: {found:,} bytes, more than the {max_bytes:,} allowed")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        fs.get_file(path, str(tmp))
    return target


def upload(source: Path, location: str | Path) -> None:
    """Copy local file `source` to `location` (on a store, one PUT: the object appears whole or not at all)."""
    if not is_url(location):
        target = local_path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(source.read_bytes())
        return
    fs, path = filesystem(location)
    fs.put_file(str(source), path)


def cache_key(location: str | Path) -> str:
    """A folder-safe name for a store location (for a local cache of it)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(location)).strip("_")[-200:] or "root"


def default_cache_root() -> Path:
    """Where stage shards read from a store are cached: $CHAM_CACHE_DIR, else ~/.cache/chameleon-pipeline."""
    base = os.environ.get("CHAM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "chameleon-pipeline")
    return Path(base)
