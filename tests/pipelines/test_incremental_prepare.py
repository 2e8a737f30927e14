"""Incremental builds: new inputs (whatever their names) are the only work, every earlier shard stays byte-identical,
the manifest is a snapshot of all builds; a removed or changed input is detected and its shards dropped or redone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipelines.prepare_job import run_prepare
from schemas import PrepareConfig, validate_config


def config(inputs: Path, out: Path, tokenizers: dict[str, Path]) -> PrepareConfig:
    data = {
        "output_dir": str(out),
        "image_size": 64,
        "samples_per_shard": 20,
        "tokenizers": {k: str(v) for k, v in tokenizers.items()},
        "sources": [{"name": "web", "kind": "text", "format": "jsonl", "paths": [str(inputs)]}],
    }
    return validate_config(PrepareConfig, data)


def split(lines: list[str], folder: Path, names: dict[str, slice]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in names.items():
        (folder / name).write_text("".join(lines[part]))


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "web").glob("shard-*")) if p.is_file()}


def test_a_build_adds_only_what_is_new_and_keeps_the_rest_byte_for_byte(
    sample_data, tiny_tokenizers, tmp_path: Path
) -> None:
    raw = sample_data[0] / "text"
    lines = [line for f in sorted(raw.glob("prose-*.jsonl")) for line in f.read_text().splitlines(keepends=True)]
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    split(lines, inputs, {"m.jsonl": slice(0, 40), "n.jsonl": slice(40, 80)})
    first = run_prepare(config(inputs, out, tiny_tokenizers))
    old = first["shards_written"]["web"]
    assert old >= 4  # each file is cut into tasks of about 20 records, one shard each
    before = shard_files(out)

    # Night 2: one file that sorts before the others and one after (before, the first re-tokenized everything).
    split(lines, inputs, {"a.jsonl": slice(80, 100), "z.jsonl": slice(100, 130)})
    second = run_prepare(config(inputs, out, tiny_tokenizers))
    new = second["shards_written"]["web"]
    assert new >= 2 and second["shards_skipped"]["web"] == old  # only the new files were read
    after = shard_files(out)
    assert {k: v for k, v in after.items() if k in before} == before  # every earlier shard, byte for byte
    manifest = json.loads((out / "web" / "manifest.json").read_text())
    names = [f"shard-{i:05d}" for i in range(old + new)]
    assert [s["shard"] for s in manifest["shards"]] == names  # a snapshot of both builds
    assert manifest["totals"]["records_in"] == 130
    build = manifest["builds"][-1]
    assert [b["build"] for b in manifest["builds"]] == [1, 2]
    assert build["new_shards"] == names[old:] and build["reused_shards"] == old
    assert (build["new_records"], build["reused_records"]) == (50, 80)
    # Which shards hold the new files' records: the new ones only.
    stats = {n: json.loads((out / "web" / f"{n}.stats.json").read_text()) for n in names}
    assert {Path(stats[n]["task"][0]).name for n in names[old:]} == {"a.jsonl", "z.jsonl"}

    # The same inputs from scratch: the same samples (the shards are numbered in another order).
    clean = run_prepare(config(inputs, tmp_path / "clean", tiny_tokenizers))
    assert clean["manifests"]["web"]["totals"] == manifest["totals"]

    # A removed input: its shards leave the snapshot (and the folder); a changed one is redone under new ids.
    (inputs / "m.jsonl").unlink()
    (inputs / "n.jsonl").write_text("".join(lines[40:79]))  # one record fewer
    third = run_prepare(config(inputs, out, tiny_tokenizers))
    manifest = json.loads((out / "web" / "manifest.json").read_text())
    build = manifest["builds"][-1]
    assert build["removed_shards"] == names[:old]  # m.jsonl's shards, and n.jsonl's old ones
    redone = third["shards_written"]["web"]
    assert build["new_shards"] == [f"shard-{i:05d}" for i in range(old + new, old + new + redone)]
    assert manifest["totals"]["records_in"] == 20 + 30 + 39
    assert not (out / "web" / f"{names[0]}.tar").exists()
    kept = tuple(names[old:])  # the second build's shards, untouched
    assert {k: v for k, v in shard_files(out).items() if k.startswith(kept)} == {
        k: v for k, v in after.items() if k.startswith(kept)
    }

    # Nothing new: nothing written; the build is recorded, with nothing new.
    again = run_prepare(config(inputs, out, tiny_tokenizers))
    assert again["shards_written"]["web"] == 0
    last = json.loads((out / "web" / "manifest.json").read_text())["builds"][-1]
    assert (last["build"], last["new_shards"], last["removed_shards"], last["new_records"]) == (4, [], [], 0)
    shutil.rmtree(tmp_path / "clean")
