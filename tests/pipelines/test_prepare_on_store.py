"""`cham prepare` with its inputs and its output on an object store (a real S3 API: moto's server on 127.0.0.1):
the shards on the store are those of the same job on disk, byte for byte, and a job killed while uploading is
completed by its re-run."""

from __future__ import annotations

import json
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
    remote = tmp_path / "remote.yaml"
    remote.write_text(
        yaml.safe_dump(config(f"{s3_bucket}/raw/text/*.jsonl", f"{s3_bucket}/raw/image_text", out, tiny_tokenizers))
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
    # Killed while uploading: a shard and the manifest of a source never reached the store. The re-run completes it.
    shards = sorted(p for p in fs.ls(f"{out}/photos") if p.endswith(".tar"))
    fs.rm(shards[0])
    fs.rm(f"{out}/photos/manifest.json")
    again = CliRunner().invoke(app, ["prepare", str(remote)])
    assert again.exit_code == 0, again.output
    assert fs.exists(shards[0]) and fs.exists(f"{out}/photos/manifest.json")
    assert "│ 0/" in " ".join(again.output.split())  # nothing re-tokenized: the staging folder's shards were complete
