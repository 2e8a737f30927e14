"""The prepare job on the sample corpus: exact counts, valid token layouts, manifests, re-runs, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.demo import SAMPLE_SOURCES
from pipelines.prepare_job import PrepareError, run_prepare
from pipelines.shard_writer import read_shard
from schemas import PrepareConfig, validate_config
from schemas.vocab import TINY

SOURCES = SAMPLE_SOURCES  # the sample corpus as prepare sources: (name, kind, format, path under raw/)


def make_config(raw: Path, out: Path, tokenizers: dict[str, Path], **overrides) -> PrepareConfig:
    data = {
        "output_dir": str(out),
        "image_size": 64,
        "samples_per_shard": 40,
        "tokenizers": {k: str(v) for k, v in tokenizers.items()},
        "sources": [{"name": n, "kind": k, "format": f, "paths": [str(raw / p)]} for n, k, f, p in SOURCES],
    } | overrides
    return validate_config(PrepareConfig, data)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sample_data, tiny_tokenizers) -> tuple[PrepareConfig, dict]:
    out = tmp_path_factory.mktemp("prepared")
    config = make_config(sample_data[0], out, tiny_tokenizers, write_images=True)
    return config, run_prepare(config)


def test_counts_add_up_for_every_source(prepared) -> None:
    _, result = prepared
    totals = {name: m["totals"] for name, m in result["manifests"].items()}
    assert {n: t["samples"] for n, t in totals.items()} == {
        "prose": 130,
        "code": 70,
        "photos": 24,
        "howto": 12,
        "instructions": 30,
    }
    for t in totals.values():
        assert t["records_in"] == t["samples"] + t["rejects"] and t["rejects"] == 0
    assert (totals["photos"]["images"], totals["howto"]["images"], totals["instructions"]["images"]) == (24, 15, 18)
    assert 3 <= totals["photos"]["faces"] <= 6  # frontal faces that survive the center crop
    assert result["shards_written"] == {"prose": 4, "code": 2, "photos": 2, "howto": 1, "instructions": 1}


def test_shards_hold_well_formed_token_sequences(prepared) -> None:
    config, _ = prepared
    vocab_boi, vocab_eoi = TINY.boi_id, TINY.eoi_id
    for name, kind, _, _ in SOURCES:
        folder = Path(config.output_dir) / name
        for tar in sorted(folder.glob("shard-*.tar")):
            for sample in read_shard(tar):
                ids, meta = sample["tokens"], sample["meta"]
                assert ids.dtype == np.uint16 and "." not in sample["key"]
                assert ids[0] == 0 and ids[-1] == 2 and ids.max() < TINY.vocab_size
                assert meta["n_tokens"] == len(ids) and meta["kind"] == kind and meta["source"] == name
                boi = np.flatnonzero(ids == vocab_boi)
                assert len(boi) == meta["n_images"] == len(sample["images_jpg"])
                for start in boi:  # every image is BOI, 64 codes, EOI
                    assert ids[start + 65] == vocab_eoi and (ids[start + 1 : start + 65] < vocab_eoi).all()
                if kind == "sft":
                    n = meta["n_prompt_tokens"]
                    assert n > 1 and ids[n - 1] == TINY.sep_id
                else:
                    assert meta["n_prompt_tokens"] == 0


def test_manifest_and_rejects_files(prepared) -> None:
    config, result = prepared
    folder = Path(config.output_dir) / "photos"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == result["manifests"]["photos"]
    assert manifest["kind"] == "image_text" and len(manifest["tokenizers"]["image_fingerprint"]) == 16
    assert [s["shard"] for s in manifest["shards"]] == ["shard-00000", "shard-00001"]
    for shard in manifest["shards"]:
        assert pq.read_table(folder / f"{shard['shard']}.rejects.parquet").num_rows == shard["rejects"] == 0
    assert not list(Path(config.output_dir).rglob("*.tmp"))


def test_rerun_skips_complete_shards_and_redoes_the_rest(prepared, tmp_path: Path) -> None:
    config, _ = prepared
    out = tmp_path / "copy"
    shutil.copytree(config.output_dir, out)
    config = config.model_copy(update={"output_dir": out})
    before = {p: p.read_bytes() for p in out.rglob("shard-*") if p.is_file()}
    result = run_prepare(config)
    assert sum(result["shards_written"].values()) == 0
    (out / "prose" / "shard-00002.stats.json").unlink()  # as if killed before its stats were written
    (out / "prose" / "shard-00002.tar").write_bytes(b"half a tar")
    (out / "prose" / ".shard-00002.tar.4242.deadbeef.tmp").write_bytes(b"what the killed writer was writing")
    result = run_prepare(config)
    assert [p.name for p in out.rglob(".*")] == [".lock"]  # the lock; no temporary left
    assert result["shards_written"] == {"prose": 1, "code": 0, "photos": 0, "howto": 0, "instructions": 0}
    after = {p: p.read_bytes() for p in out.rglob("shard-*") if p.is_file()}
    assert after == before  # redone shard is byte-identical; nothing else changed


def test_changed_config_redoes_the_source(prepared, tmp_path: Path, sample_data, tiny_tokenizers) -> None:
    config, _ = prepared
    out = tmp_path / "copy"
    shutil.copytree(config.output_dir, out)
    changed = make_config(sample_data[0], out, tiny_tokenizers, write_images=True, caption_first_ratio=0.0)
    result = run_prepare(changed)
    # Only image-text pairs depend on the caption order, but every source's fingerprint holds the settings.
    assert result["shards_written"]["photos"] == 2


def test_tokenizers_that_do_not_fit(sample_data, tiny_tokenizers, tmp_path: Path) -> None:
    config = make_config(sample_data[0], tmp_path, tiny_tokenizers, image_size=128)
    with pytest.raises(PrepareError, match="image_size 128 does not match the VQ tokenizer's 64 px"):
        run_prepare(config)
