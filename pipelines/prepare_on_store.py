"""The prepare job with its inputs or its output on an object store (s3://, gs://, az://, any fsspec URL).

The job itself runs on this machine's disk: input files on a store are copied into the cache first (a file already
there at the same size is kept), the job writes into a local staging folder (the same folder again on a re-run here,
so complete shards are skipped as usual), and each source folder is uploaded with its manifest.json last: a store
has no rename, and a reader (the mix job) takes a source as whole only once its manifest is there. The deduplication
index of earlier builds is fetched from the store before the job, so a build on another machine still rejects what
an earlier one kept. A job killed while uploading leaves a source without its manifest; the re-run uploads it again,
over the same names (no duplicate, no partial shard taken as whole).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.files import storage
from pipelines.dedup import INDEX_DIR
from pipelines.prepare_job import MANIFEST, run_prepare
from schemas.prepare_config import PrepareConfig

_GLOB = set("*?[")


def on_store(config: PrepareConfig) -> bool:
    """Whether the config names an object store anywhere (its output, or a source's paths)."""
    return storage.is_url(config.output_dir) or any(storage.is_url(p) for s in config.sources for p in s.paths)


def copy_inputs(pattern: str) -> Path:
    """A local folder holding the files a source pattern on a store names (a file, a folder or a glob), copied into
    the cache under their paths relative to the pattern's fixed part."""
    fs, path = storage.filesystem(pattern)
    fixed = path.split("*")[0].split("?")[0].split("[")[0].rstrip("/")
    if any(c in path for c in _GLOB):
        files, base = fs.glob(path), fixed.rsplit("/", 1)[0]
    elif fs.isdir(path):
        files, base = fs.find(path), path.rstrip("/")
    else:
        files, base = [path], path.rsplit("/", 1)[0]
    if not files:
        raise FileNotFoundError(f"input not found: {pattern}")
    folder = storage.default_cache_root() / "prepare-in" / storage.cache_key(pattern)
    for file in files:
        target = folder / file[len(base) :].lstrip("/")
        if not target.is_file() or target.stat().st_size != int(fs.size(file)):
            storage.download(f"{pattern.split('://', 1)[0]}://{file}", target)
    return folder


def local_config(config: PrepareConfig) -> PrepareConfig:
    """`config` with every input on a store replaced by its local copy, and the output by a local staging folder."""
    data = config.model_dump(mode="json")
    for source in data["sources"]:
        source["paths"] = [str(copy_inputs(p)) if storage.is_url(p) else p for p in source["paths"]]
    if storage.is_url(config.output_dir):
        data["output_dir"] = str(staging_folder(config))
    return PrepareConfig.model_validate(data)


def staging_folder(config: PrepareConfig) -> Path:
    """Where a job whose output is on a store writes first (the output folder itself when it is local)."""
    return storage.local_mirror(config.output_dir, "prepare-out")


def run_prepare_anywhere(config: PrepareConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """run_prepare, for inputs and an output that may be on an object store (see the module docstring)."""
    if not on_store(config):
        return run_prepare(config, progress)
    local = local_config(config)
    out = config.output_dir
    if storage.is_url(out) and storage.exists(storage.join(out, INDEX_DIR)):
        index = storage.join(out, INDEX_DIR)
        fs, path = storage.filesystem(index)
        for file in fs.find(path):  # the earlier builds' dedup entries
            target = Path(local.output_dir) / INDEX_DIR / file[len(path) :].lstrip("/")
            if not target.is_file():
                storage.download(f"{str(out).split('://', 1)[0]}://{file}", target)
    result = run_prepare(local, progress)
    if storage.is_url(out):
        for name in result["manifests"]:
            storage.upload_folder(Path(local.output_dir) / name, storage.join(out, name), last=MANIFEST)
        index = Path(local.output_dir) / INDEX_DIR
        if index.is_dir():
            storage.upload_folder(index, storage.join(out, INDEX_DIR))
    return {**result, "staging": str(local.output_dir)}
