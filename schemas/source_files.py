"""The input files of a prepare source: paths, folders and globs expanded once, safely.

Symbolic links are followed, but every file is listed once under its first path (a `**` glob through a directory
link that points back up, a loop, would otherwise list the same file again at every level), and a folder is walked
once however many links lead to it. A link whose target is gone is listed, not dropped: the reader counts it as
an unreadable file, so it is neither silently lost nor able to stop the whole source.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import BinaryIO

GLOB_CHARS = set("*?[")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SKIP_PIECE = 1 << 20  # the rest of a line that is too long is read and dropped in pieces of this size

# File names each source format reads; folders also hold sidecars (img2dataset writes .parquet and _stats.json
# beside each .tar), which a folder or glob skips but a file named on its own may not be.
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zip", ".json.zip"),
    "parquet": (".parquet",),
    "webdataset": (".tar",),
}


def of_format(path: str | Path, fmt: str) -> bool:
    """Whether a file name is one the `fmt` reader reads."""
    return str(path).lower().endswith(FORMAT_SUFFIXES[fmt])


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob (with `**` for any number of folders) as a regex over whole paths; `*` does not cross `/`."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:[^/]*/)*", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            out, i = out + fnmatch.translate(pattern[i : end + 1])[4:-3], end + 1  # fnmatch's class syntax
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _walk(top: Path) -> list[Path]:
    """Every file below `top` (links followed, each real folder entered once), sorted; dangling links included."""
    files, seen = [], set()
    for folder, dirs, names in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back to a folder already walked: a loop, or a second way in
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        files += [Path(folder) / n for n in names]
    return sorted(files)


def pattern_files(pattern: str) -> list[Path]:
    """Every file a path, folder or glob names (links followed, each real folder walked once), sorted; [] if none."""
    if not GLOB_CHARS & set(pattern):
        path = Path(pattern)
        if path.is_dir():
            return _walk(path)
        return [path] if path.exists() or path.is_symlink() else []
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    top = Path(*parts[:fixed]) if fixed else Path(".")
    if not top.is_dir():
        return []
    regex = _glob_regex(pattern)
    # Hidden files are left out unless the pattern names them, as the shell and Python's glob do.
    hidden_ok = any(part.startswith(".") for part in parts[fixed:])
    matches = []
    for path in _walk(top):
        # A folder the pattern matches stands for every file below it, as in a folder path.
        for candidate in [path, *path.parents[: len(path.parts) - fixed - 1]]:
            names = candidate.parts[fixed:]
            if regex.match(str(candidate)) and (hidden_ok or not any(n.startswith(".") for n in names)):
                matches.append(path)
                break
    return sorted(matches)


def unique_files(paths: list[Path]) -> list[Path]:
    """`paths` in order, each real file once (under the first path that reaches it)."""
    seen: set[str] = set()
    out = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def store_files(pattern: str) -> list[str]:
    """Every object a store URL names (an object, a folder's objects at any depth, or a glob), as URLs, sorted; []
    if none. Listed fresh: another job may have added inputs since fsspec last listed the folder."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0]
    fs.invalidate_cache()
    if GLOB_CHARS & set(path):
        matches = fs.glob(path, detail=True)  # a folder it matches stands for every file below it
        found = [f for p, info in matches.items() for f in (fs.find(p) if info["type"] == "directory" else [p])]
    elif fs.isdir(path):
        found = fs.find(path)
    else:
        found = [path] if fs.exists(path) else []
    hidden_ok = "/." in "/" + path
    return sorted({f"{protocol}://{f}" for f in found if hidden_ok or "/." not in "/" + f})


def is_store_url(location: str | Path) -> bool:
    """Whether a path names an object store (`s3://`, `gs://`, ...; `file://` is local)."""
    text = str(location)
    return bool(_URL.match(text)) and not text.startswith("file://")


def source_files(patterns: list[str] | tuple[str, ...], fmt: str) -> list[Path | str]:
    """The files of `fmt` that `patterns` name, each once (by its real path), in a stable order; objects of a store
    pattern (`s3://...`) as URLs (str), read there by the job's workers.

    A file named on its own must be of the format (ValueError naming it otherwise); folders and globs keep only
    files of the format. A pattern with no file of the format raises FileNotFoundError naming it.
    """
    files: list[Path | str] = []
    for pattern in map(str, patterns):
        if is_store_url(pattern):
            listed_urls = store_files(pattern)
            if not listed_urls:
                raise FileNotFoundError(f"input not found: {pattern}")
            urls = [u for u in listed_urls if of_format(u, fmt)]
            if not urls:
                raise FileNotFoundError(f"no {fmt} file ({', '.join(FORMAT_SUFFIXES[fmt])}) found at {pattern}")
            files += urls
            continue
        explicit = not GLOB_CHARS & set(pattern) and not Path(pattern).is_dir()
        if explicit and not of_format(pattern, fmt):
            raise ValueError(f"{pattern} is not a {fmt} file; {fmt} sources read {', '.join(FORMAT_SUFFIXES[fmt])}")
        listed = pattern_files(pattern)
        found = [p for p in listed if of_format(p, fmt)]
        if not listed:
            glob = GLOB_CHARS & set(pattern)
            raise FileNotFoundError(
                f"no file matches the pattern {pattern}" if glob else f"path does not exist: {pattern}"
            )
        if not found:
            raise FileNotFoundError(f"no {fmt} file ({', '.join(FORMAT_SUFFIXES[fmt])}) found at {pattern}")
        files += found
    return unique_files(files)


def read_bounded_line(f: BinaryIO, limit: int) -> tuple[bytes | None, int]:
    """The next line of a binary stream and its length in bytes; None for a line over `limit` bytes, which is
    consumed in pieces and never held whole (a 129 MiB line of a 128 kB .gz must not cost a gigabyte)."""
    line = f.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, len(line)
    size = len(line)
    del line
    while True:
        piece = f.readline(SKIP_PIECE)
        size += len(piece)
        if not piece or piece.endswith(b"\n"):
            return None, size
