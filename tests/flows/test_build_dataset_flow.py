"""The build-dataset flow under the Prefect test harness: counts per source, rejects by reason, skipped shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest

from flows.build_dataset import build_dataset
from schemas import PrepareConfig, validate_config

pytestmark = pytest.mark.slow


@pytest.fixture()
def prepare_config(tmp_path: Path, sample_data, tiny_tokenizers) -> PrepareConfig:
    raw = sample_data[0]
    prose = tmp_path / "prose.jsonl"
    shutil.copy(next((raw / "text").glob("*.jsonl")), prose)
    with prose.open("a") as f:  # two broken lines: each must come back as a reject with its reason
        f.write('{"id": "broken-1", "text": \n{"id": "broken-2", "text": "fine"\n')
    return validate_config(
        PrepareConfig,
        {
            "output_dir": str(tmp_path / "prepared"),
            "image_size": 64,
            "samples_per_shard": 40,
            "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
            "sources": [
                {"name": "prose", "kind": "text", "format": "jsonl", "paths": [str(prose)]},
                {
                    "name": "photos",
                    "kind": "image_text",
                    "format": "webdataset",
                    "paths": [str(raw / "image_text" / "*.tar")],
                },
            ],
        },
    )


def test_build_dataset_reports_counts_and_skips_complete_shards(prefect_api, prepare_config: PrepareConfig) -> None:
    state = build_dataset(config=prepare_config, return_state=True)
    assert state.is_completed(), state.message
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    rows = {r["source"]: r for r in prefect_api.by_key(artifacts, "build-dataset-sources")["data"]}
    out = Path(prepare_config.output_dir)
    for name in ("prose", "photos"):
        totals = json.loads((out / name / "manifest.json").read_text())["totals"]
        row = rows[name]
        assert (row["records in"], row["samples out"], row["rejects"]) == (
            totals["records_in"],
            totals["samples"],
            totals["rejects"],
        )
        assert row["records in"] == row["samples out"] + row["rejects"]  # every record is accounted for
        assert row["shards skipped"] == 0 and row["shards new"] == len(list((out / name).glob("*.stats.json")))
    assert rows["prose"]["rejects"] == 2 and "bad_json: 2" in rows["prose"]["rejects by reason"]
    assert rows["photos"]["images"] == rows["photos"]["samples out"] > 0
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert len(progress) == 1 and progress[0]["data"] == 100.0

    again = build_dataset(config=prepare_config, return_state=True)  # what a retry or the next night does
    assert again.is_completed(), again.message
    rows2 = {
        r["source"]: r
        for r in prefect_api.by_key(prefect_api.artifacts(again.state_details.flow_run_id), "build-dataset-sources")[
            "data"
        ]
    }
    assert all(r["shards new"] == 0 and r["shards skipped"] == rows[n]["shards new"] for n, r in rows2.items())
    assert all(rows2[n]["samples out"] == rows[n]["samples out"] for n in rows)


def test_build_dataset_into_a_store(prefect_api, prepare_config: PrepareConfig, s3_bucket: str, monkeypatch) -> None:
    """An output on the store: the flow's progress, counts and manifests come from there, its config is kept in
    this machine's mirror, and nothing is written to a local folder named after the URL."""
    monkeypatch.setenv("CHAM_CACHE_DIR", str(Path(prepare_config.output_dir).parent / "cache"))
    monkeypatch.chdir(Path(prepare_config.output_dir).parent)
    out = f"{s3_bucket}/prepared"
    config = prepare_config.model_copy(update={"output_dir": out, "sources": prepare_config.sources[:1]})
    state = build_dataset(config=config, return_state=True)
    assert state.is_completed(), state.message
    (row,) = prefect_api.by_key(prefect_api.artifacts(state.state_details.flow_run_id), "build-dataset-sources")["data"]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    manifest = json.loads(fs.cat_file(f"{out}/prose/manifest.json"))
    assert (row["records in"], row["rejects"]) == (manifest["totals"]["records_in"], 2)
    assert row["shards new"] == len(manifest["shards"]) == len(fs.glob(f"{out}/prose/shard-*.stats.json")) > 1
    assert not Path("s3:").exists()  # the bug this guards against: a local folder named `s3:`
    mirrors = list((Path(prepare_config.output_dir).parent / "cache" / "prepare-logs").glob("*/prepare-config.yaml"))
    assert len(mirrors) == 1 and out in mirrors[0].read_text()
