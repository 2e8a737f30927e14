"""`cham prepare` with its inputs and its output on an object store (a real S3 API: moto's server on 127.0.0.1):
the workers read the inputs and put the shards there themselves (nothing is copied through this machine's disk), the
shards on the store are those of the same job on disk, byte for byte, and a job killed while putting a shard is
completed by its re-run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import yaml
from typer.testing import CliRunner

from flows.cli import app


def config(raw_text: str, raw_images: str, out: str, tokenizers: dict) -> dict:
    return {
        "output_dir": out,
        "image_size": 64,
        "tokenizers": {k: str(v) for k, v in tokenizers.items()},
        "sources": [
            {"name": "prose", "kind": "text", "format": "jsonl", "paths": [raw_text]},
            {"name": "photos", "kind": "image_text", "format": "webdataset", "paths": [raw_images]},
        ],
    }


def test_prepare_from_and_to_the_store_equals_the_job_on_disk(
    sample_data, tiny_tokenizers, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("CHAM_CACHE_DIR", str(tmp_path / "cache"))
    raw = sample_data[0]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(raw / "text"), f"{s3_bucket}/raw/text", recursive=True)
    fs.put(str(raw / "image_text"), f"{s3_bucket}/raw/image_text", recursive=True)
    local = tmp_path / "local.yaml"
    local.write_text(
        yaml.safe_dump(
            config(str(raw / "text/*.jsonl"), str(raw / "image_text"), str(tmp_path / "out"), tiny_tokenizers)
        )
    )
    out = f"{s3_bucket}/prepared"
    for name, folder in tiny_tokenizers.items():  # the tokenizers on the store too: each worker fetches its copy
        fs.put(str(folder), f"{s3_bucket}/tokenizers/{name}", recursive=True)
    on_store = {name: f"{s3_bucket}/tokenizers/{name}" for name in tiny_tokenizers}
    remote = tmp_path / "remote.yaml"
    remote.write_text(
        yaml.safe_dump(config(f"{s3_bucket}/raw/text/*.jsonl", f"{s3_bucket}/raw/image_text", out, on_store))
    )
    assert CliRunner().invoke(app, ["prepare", str(local)]).exit_code == 0
    done = CliRunner().invoke(app, ["prepare", str(remote)])
    assert done.exit_code == 0, done.output
    for source in ("prose", "photos"):
        mine = sorted(p.name for p in (tmp_path / "out" / source).iterdir() if p.name.endswith(".tar"))
        assert mine and sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/{source}") if p.endswith(".tar")) == mine
        for name in mine:
            assert fs.cat_file(f"{out}/{source}/{name}") == (tmp_path / "out" / source / name).read_bytes(), name
        manifest = json.loads(fs.cat_file(f"{out}/{source}/manifest.json"))
        assert manifest["totals"] == json.loads((tmp_path / "out" / source / "manifest.json").read_text())["totals"]
        assert manifest["tokenizers"]["text"] == on_store["text"]
    # Read and written there by the job's workers: nothing copied into, or staged in, this machine's cache, but the
    # tokenizers a library loads from disk and the job's log.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["prepare-logs", "tokenizers"]
    # Killed while a shard was being put: its tar reached the store, its stats file (the marker, put last) did not,
    # nor the source's manifest. The re-run redoes that shard only, and the store ends as the job on disk.
    stats = sorted(p for p in fs.ls(f"{out}/photos") if p.endswith(".stats.json"))
    fs.rm(stats[0])
    fs.pipe_file(stats[0].replace(".stats.json", ".tar"), b"half a tar")
    fs.rm(f"{out}/photos/manifest.json")
    again = CliRunner().invoke(app, ["prepare", str(remote)])
    assert again.exit_code == 0, again.output
    assert fs.exists(stats[0]) and fs.exists(f"{out}/photos/manifest.json")
    redone = " ".join(again.output.split())
    assert f"│ 1/{len(stats) - 1} │" in redone and "│ 0/" in redone, again.output  # photos 1 redone, prose none
    name = stats[0].rsplit("/", 1)[-1].replace(".stats.json", ".tar")
    assert fs.cat_file(f"{out}/photos/{name}") == (tmp_path / "out" / "photos" / name).read_bytes()
    # The next nightly build, on another machine (an empty cache): a new input file, whatever its name, is the only
    # work; every shard already on the store stays byte for byte.
    shutil.rmtree(tmp_path / "cache")
    before = {p: fs.cat_file(p) for p in fs.glob(f"{out}/*/shard-*.tar")}
    fs.pipe_file(f"{s3_bucket}/raw/text/000-new.jsonl", b'{"text": "A new document arrived overnight."}\n')
    nightly = CliRunner().invoke(app, ["prepare", str(remote)])
    assert nightly.exit_code == 0, nightly.output
    fs.invalidate_cache()
    after = {p: fs.cat_file(p) for p in fs.glob(f"{out}/*/shard-*.tar")}
    assert len(after) == len(before) + 1 and all(after[p] == data for p, data in before.items())
    build = json.loads(fs.cat_file(f"{out}/prose/manifest.json"))["builds"][-1]
    assert (len(build["new_shards"]), build["new_records"]) == (1, 1)
