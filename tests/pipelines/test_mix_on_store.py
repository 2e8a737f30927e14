"""`cham mix` with its sources and its output on an object store (a real S3 API: moto's server on 127.0.0.1): the
planner and the workers read the sources there and put the stage shards there themselves; the stages on the store
equal those of the same mix on disk, byte for byte, each with its manifest last."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import yaml
from typer.testing import CliRunner

from flows.cli import app


def spec(prose: str, photos: str) -> dict:
    sources = [
        {"name": "prose", "path": prose, "weight": 1.0, "filters": ["text_length >= 40"]},  # attributes read there
        {"name": "photos", "path": photos, "weight": 1.0},
    ]
    return {
        "seq_len": 128,
        "tokens_per_image": 64,
        "max_repetitions": 16,
        "seed": 1,
        "stages": {"stage1": {"tokens": 6_000, "sources": sources}},
    }


def test_a_mix_from_and_to_the_store_equals_the_mix_on_disk(
    prepared_sources: Path, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("CHAM_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for name in ("prose", "photos"):
        fs.put(str(prepared_sources / name), f"{s3_bucket}/prepared/{name}", recursive=True)
    local_spec = tmp_path / "local.yaml"
    local_spec.write_text(yaml.safe_dump(spec(str(prepared_sources / "prose"), str(prepared_sources / "photos"))))
    remote_spec = tmp_path / "remote.yaml"
    remote_spec.write_text(yaml.safe_dump(spec(f"{s3_bucket}/prepared/prose", f"{s3_bucket}/prepared/photos")))

    on_disk = CliRunner().invoke(app, ["mix", str(local_spec), "--out", str(tmp_path / "mixed")])
    assert on_disk.exit_code == 0, on_disk.output
    out = f"{s3_bucket}/mixed"
    on_store = CliRunner().invoke(app, ["mix", str(remote_spec), "--out", out])
    assert on_store.exit_code == 0, on_store.output
    assert f"plot: {out}/report.png" in " ".join(on_store.output.split())

    local_files = sorted(p.name for p in (tmp_path / "mixed" / "stage1").iterdir())
    remote_files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/stage1"))
    assert remote_files == local_files and "manifest.json" in remote_files
    for name in local_files:
        if name.endswith(".tar"):  # the packed sequences: byte for byte
            assert fs.cat_file(f"{out}/stage1/{name}") == (tmp_path / "mixed" / "stage1" / name).read_bytes(), name
    remote_manifest = json.loads(fs.cat_file(f"{out}/stage1/manifest.json"))
    local_manifest = json.loads((tmp_path / "mixed" / "stage1" / "manifest.json").read_text())
    assert remote_manifest["shards"] == local_manifest["shards"]
    assert remote_manifest["filters"] == local_manifest["filters"] and remote_manifest["filters"]["prose"]
    # The planner and the workers read the sources there and put the stage there: nothing through the local cache
    # but the job's lock (one mix job into an output at a time, on this machine).
    cached = sorted(str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert [Path(p).name for p in cached] == [".lock"] and cached[0].startswith("mix-logs/"), cached
    assert remote_manifest["fingerprint"] != local_manifest["fingerprint"]  # the spec's paths are part of it
    # A source missing on the store is named.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec(f"{s3_bucket}/prepared/none", f"{s3_bucket}/prepared/photos")))
    refused = CliRunner().invoke(app, ["mix", str(bad), "--out", out])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 1 and f"{s3_bucket}/prepared/none is not a prepared source" in said, said
