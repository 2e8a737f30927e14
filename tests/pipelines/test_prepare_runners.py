"""The same prepare job on the local (multi-process) runner and on a Dask cluster writes the same shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.prepare_job import run_prepare
from schemas import PrepareConfig, validate_config


def config_for(raw: Path, out: Path, tokenizers: dict[str, Path], runner: dict) -> PrepareConfig:
    return validate_config(
        PrepareConfig,
        {
            "output_dir": str(out),
            "image_size": 64,
            "samples_per_shard": 40,
            "runner": runner,
            "tokenizers": {k: str(v) for k, v in tokenizers.items()},
            "sources": [
                {"name": "prose", "kind": "text", "format": "jsonl", "paths": [str(raw / "text/*.jsonl")]},
                {"name": "photos", "kind": "image_text", "format": "webdataset", "paths": [str(raw / "image_text")]},
                {"name": "howto", "kind": "interleaved", "format": "parquet", "paths": [str(raw / "interleaved")]},
            ],
        },
    )


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("shard-*.tar"))}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, sample_data, tiny_tokenizers) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("embedded")
    run_prepare(config_for(sample_data[0], out, tiny_tokenizers, {"kind": "embedded"}))
    return shard_bytes(out)


@pytest.mark.slow
def test_local_runner_with_two_processes(embedded, sample_data, tiny_tokenizers, tmp_path: Path) -> None:
    run_prepare(config_for(sample_data[0], tmp_path, tiny_tokenizers, {"kind": "local", "workers": 2}))
    assert shard_bytes(tmp_path) == embedded and len(embedded) == 7


@pytest.mark.slow
def test_dask_cluster_on_loopback(embedded, sample_data, tiny_tokenizers, tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        config = config_for(
            sample_data[0], tmp_path, tiny_tokenizers, {"kind": "dask", "address": cluster.scheduler_address}
        )
        result = run_prepare(config)
    assert {n: m["totals"]["samples"] for n, m in result["manifests"].items()} == {
        "prose": 130,
        "photos": 24,
        "howto": 12,
    }
    assert shard_bytes(tmp_path) == embedded  # same token content and counts, byte for byte
