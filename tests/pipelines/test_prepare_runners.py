"""The same prepare job on the local (multi-process) runner and on a Dask cluster writes the same shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.prepare_job import dask_threads, run_prepare
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


def test_tokenizing_in_the_read_stage_writes_the_shards_the_join_does(
    embedded, sample_data, tiny_tokenizers, tmp_path: Path, monkeypatch
) -> None:
    """Sources without dedup tokenize where they are read (ReadAndTokenize); the path through RunInference and the
    join, which deduplicated sources take, writes the same bytes."""
    import pipelines.prepare_job as prepare_job

    monkeypatch.setattr(prepare_job, "tokenizes_in_read", lambda source: False)
    run_prepare(config_for(sample_data[0], tmp_path, tiny_tokenizers, {"kind": "embedded"}))
    assert shard_bytes(tmp_path) == embedded and len(embedded) == 7


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
        assert dask_threads(cluster.scheduler_address) == 2  # asked of the scheduler: 2 workers of 1 thread
        result = run_prepare(config)
    assert {n: m["totals"]["samples"] for n, m in result["manifests"].items()} == {
        "prose": 130,
        "photos": 24,
        "howto": 12,
    }
    assert shard_bytes(tmp_path) == embedded  # same token content and counts, byte for byte


@pytest.mark.slow
def test_a_dask_cluster_of_separate_processes_with_the_data_on_s3(
    embedded, sample_data, tiny_tokenizers, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    """A user's cluster: `dask scheduler` and `dask worker` as processes of their own on 127.0.0.1 (not LocalCluster),
    the raw data and the output on the S3 server; the shards are the embedded runner's, byte for byte."""
    import socket
    import subprocess
    import sys
    import time

    import fsspec
    from distributed import Client

    from flows.process_lifetime import tied_to_this_process

    monkeypatch.setenv("CHAM_CACHE_DIR", str(tmp_path / "cache"))
    raw = sample_data[0]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for part in ("text", "image_text", "interleaved"):
        fs.put(str(raw / part), f"{s3_bucket}/raw/{part}", recursive=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    module = [sys.executable, "-m"]  # `dask scheduler` and `dask worker`, as their console scripts run them
    processes = [
        subprocess.Popen(
            tied_to_this_process(
                [
                    *module,
                    "distributed.cli.dask_scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--dashboard-address",
                    ":0",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        time.sleep(2)
        processes.append(
            subprocess.Popen(
                tied_to_this_process(
                    [
                        *module,
                        "distributed.cli.dask_worker",
                        address,
                        "--nworkers",
                        "2",
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                    ]
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        config = config_for(raw, tmp_path / "unused", tiny_tokenizers, {"kind": "dask", "address": address})
        data = config.model_dump(mode="json")
        data["output_dir"] = f"{s3_bucket}/prepared"
        for source, part in zip(data["sources"], ("text/*.jsonl", "image_text", "interleaved"), strict=True):
            source["paths"] = [f"{s3_bucket}/raw/{part}"]
        run_prepare(PrepareConfig.model_validate(data))
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
    on_store = {
        f"{p.split('/prepared/', 1)[1]}": fs.cat_file(p) for p in sorted(fs.glob(f"{s3_bucket}/prepared/*/shard-*.tar"))
    }
    assert on_store == embedded
