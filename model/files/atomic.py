"""Atomic writes: a file (or a folder) is written under a temporary name beside its final one and renamed into place,
so a reader never sees half of it and a killed writer leaves only a hidden temporary, never a damaged file.

The temporary name holds the writer's pid and a random part, so two writers never share one; a failed write removes
its temporary. `os.replace` is atomic on one POSIX file system (the temporary is in the same folder for that reason).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def temporary_path(path: str | Path) -> Path:
    """A hidden name beside `path`, unique to this writer: `.NAME.PID.RANDOM.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, replace_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content into (a file, or a folder the block creates); on success it
    is renamed to `path`, on an exception removed. A folder cannot replace a non-empty folder by rename: with
    `replace_folder` an existing one is removed first (the only moment `path` is absent)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if replace_folder and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(path: str | Path, data: bytes | str, encoding: str = "utf-8") -> None:
    """Write bytes or text to `path` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)
