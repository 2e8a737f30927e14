"""Locations that may be object-store URLs: a local path is used as it is, `s3://`, `gs://`, `az://`, `hdfs://`
(any fsspec protocol) through fsspec, with each store's standard credentials (AWS_* variables or ~/.aws for S3 and
AWS_ENDPOINT_URL for an S3-compatible server, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*).

`file://` URLs are local paths. Downloads go to a temporary name beside their target and are renamed into place, so
a reader never sees half a file."""

from __future__ import annotations

import io
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


def absolute(location: str | Path) -> str:
    """`location` as a string that names it from anywhere: a URL as it is, a local path made absolute."""
    return str(location) if is_url(location) else str(local_path(location).resolve())


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


def open_file(location: str | Path, mode: str = "rb") -> Any:
    """`location` opened for reading (a context manager): a local file, or a store object read in blocks (seekable:
    byte ranges of a jsonl file, a parquet footer and row groups, a zip's directory are fetched, never the whole)."""
    if not is_url(location):
        return open(local_path(location), mode)
    fs, path = filesystem(location)
    # fsspec's file has no readline(size) (a bounded line read needs it): io's buffered reader over it does.
    return io.BufferedReader(fs.open(path, mode), buffer_size=1 << 20) if mode == "rb" else fs.open(path, mode)


def read_text(location: str | Path) -> str:
    """The text of a small file (a manifest, a stats file) at `location`."""
    if not is_url(location):
        return local_path(location).read_text(encoding="utf-8")
    fs, path = filesystem(location)
    return fs.cat_file(path).decode("utf-8")


def read_texts(folder: str | Path, names: list[str]) -> dict[str, str]:
    """The texts of the small files `names` in `folder`, by name; a file missing or unreadable is left out. On a
    store they are fetched concurrently (one batch of requests, not one after the other)."""
    if not is_url(folder):
        out = {}
        for name in names:
            try:
                out[name] = local_path(folder).joinpath(name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
        return out
    fs, path = filesystem(folder)
    paths = {f"{path.rstrip('/')}/{name}": name for name in names}
    fetched = fs.cat(list(paths), on_error="omit") if paths else {}
    out = {}
    for key, data in fetched.items():
        name = paths.get(key) or paths.get(key.split("://", 1)[-1])
        if name is not None and isinstance(data, bytes):
            try:
                out[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
    return out


def identity(location: str | Path) -> list[Any]:
    """What tells a file's versions apart: [size, modification time in ns] locally, [size, ETag (or the store's
    modification time)] on a store; [None, None] when there is no file."""
    if not is_url(location):
        try:
            stat = os.stat(local_path(location))
        except (OSError, ValueError):
            return [None, None]
        return [stat.st_size, stat.st_mtime_ns]
    fs, path = filesystem(location)
    try:
        info = fs.info(path)
    except (OSError, ValueError):
        return [None, None]
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    return [int(info.get("size") or 0), str(version).strip('"') if version is not None else None]


def url_parent(location: str) -> str:
    """The folder of a file URL (`s3://bucket/a/b.jsonl` -> `s3://bucket/a`); a Path's parent for a local path."""
    if not is_url(location):
        return str(local_path(location).parent)
    return location.rstrip("/").rsplit("/", 1)[0]


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


def list_names(location: str | Path) -> list[str]:
    """Names of the entries (files and folders) directly under `location`, freshly listed; [] when it is absent."""
    if not is_url(location):
        folder = local_path(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fs, path = filesystem(location)
    fs.invalidate_cache(path)  # a store's listing is cached by fsspec: another process may have written since
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)


def read_head(location: str | Path, max_bytes: int) -> bytes:
    """At most `max_bytes` + 1 bytes from the start of the file at `location` (enough to tell it is too long)."""
    if not is_url(location):
        with open(local_path(location), "rb") as f:
            return f.read(max_bytes + 1)
    fs, path = filesystem(location)
    return fs.cat_file(path, start=0, end=max_bytes + 1)


def write_text(location: str | Path, text: str) -> None:
    """Write a small text file (atomically: a rename locally, one PUT on a store)."""
    write_bytes(location, text.encode("utf-8"))


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a file whole (atomically: a temporary renamed locally, its folder made; one PUT on a store)."""
    if not is_url(location):
        from model.files.atomic import write_atomic

        target = local_path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data)
        return
    fs, path = filesystem(location)
    fs.pipe_file(path, data)


def remove(location: str | Path) -> None:
    """Delete a file or a folder and everything under it; nothing there is fine."""
    if not is_url(location):
        import shutil

        path = local_path(location)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.invalidate_cache(path)


def upload_folder(folder: Path, location: str | Path, last: str | None = None) -> None:
    """Copy every file under local `folder` to `location`, the file named `last` after all the others (a reader that
    sees it sees the rest: the marker of a whole folder on a store without rename)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    ordered = [p for p in files if p.name != last] + [p for p in files if p.name == last]
    for file in ordered:
        upload(file, join(location, *file.relative_to(folder).parts))


def download_folder(location: str | Path, folder: Path) -> Path:
    """Copy the files directly under `location` (not its subfolders) into local `folder`; a file already there at
    the same size is not fetched again (the folder is kept up to date, not copied anew)."""
    fs, path = filesystem(location)
    fs.invalidate_cache(path)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in fs.ls(path, detail=True):
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        target = folder / name
        if entry["type"] != "file" or (target.is_file() and target.stat().st_size == int(entry["size"])):
            continue
        download(join(location, name), target)
    return folder


def local_copy(location: str | Path, kind: str = "copies") -> Path:
    """A local path holding what `location` holds: the path itself when local; for a store, a file or a folder tree
    fetched once into this machine's cache (`kind/KEY`) and kept up to date (a file there at the same size is not
    fetched again; each file is renamed into place, so two processes fetching at once never see half of one). For
    tokenizer folders and the like that a library reads from disk; every worker fetches its own."""
    if not is_url(location):
        return local_path(location)
    fs, path = filesystem(location)
    target = default_cache_root() / kind / cache_key(location)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        target = target / path.rstrip("/").rsplit("/", 1)[-1]
        if not (target.is_file() and target.stat().st_size == size(location)):
            download(location, target)
        return target
    protocol = str(location).split("://", 1)[0]
    for file, info in fs.find(path, detail=True).items():
        local = target / file[len(path.rstrip("/")) :].lstrip("/")
        if not (local.is_file() and local.stat().st_size == int(info["size"])):
            download(f"{protocol}://{file}", local)
    target.mkdir(parents=True, exist_ok=True)
    return target


def local_mirror(location: str | Path, kind: str = "runs") -> Path:
    """The local folder that stands for `location`: the folder itself when local, else a folder of this machine's
    cache where a job keeps its working files (a lock, logs being appended) and uploads them from."""
    if not is_url(location):
        return local_path(location)
    return default_cache_root() / kind / cache_key(location)
