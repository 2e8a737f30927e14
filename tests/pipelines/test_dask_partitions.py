"""On Dask, prepare asks for a dask partition per read piece, at most 4 a worker thread (Beam's DaskRunner would put
up to 128 tasks in one partition and so on one worker; more partitions than that only feed the shuffles), and the VQ
model is loaded once per worker process, not once per partition."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from apache_beam.runners.dask.dask_runner import DaskOptions

from pipelines.prepare_job import DASK_MOST_PARTITIONS, parallelism, runner_for
from pipelines.runners import pipeline_options
from pipelines.vq_inference import VQModelHandler, _EncodeGroups
from schemas import PrepareConfig, validate_config


def config_with(runner: dict, tokenizers: dict[str, Path], raw: Path) -> PrepareConfig:
    return validate_config(
        PrepareConfig,
        {
            "output_dir": "/tmp/unused",
            "image_size": 64,
            "runner": runner,
            "tokenizers": {k: str(v) for k, v in tokenizers.items()},
            "sources": [{"name": "photos", "kind": "image_text", "format": "webdataset", "paths": [str(raw)]}],
        },
    )


def todo(*tasks: int) -> dict[str, dict]:
    return {f"source{n}": {"todo": [(i, None) for i in range(count)]} for n, count in enumerate(tasks)}


def test_a_dask_job_gets_a_partition_per_read_piece_up_to_four_a_thread(sample_data, tiny_tokenizers) -> None:
    raw = sample_data[0] / "image_text"
    big = config_with({"kind": "dask", "address": "tcp://127.0.0.1:8786", "workers": 64}, tiny_tokenizers, raw)
    runner = runner_for(big, todo(15, 3))  # 15 tasks in 8 pieces each (read_parts: at most 8), 3 tasks in 8
    assert runner.options == {"dask_npartitions": 15 * 8 + 3 * 8}
    assert pipeline_options(runner).view_as(DaskOptions).npartitions == 144
    assert runner_for(big, todo(5000)).options["dask_npartitions"] == 4 * 64  # whole tasks; 4 a worker thread
    huge = config_with({"kind": "dask", "workers": 1000}, tiny_tokenizers, raw)
    assert runner_for(huge, todo(5000)).options["dask_npartitions"] == DASK_MOST_PARTITIONS
    small = config_with({"kind": "dask", "address": "tcp://127.0.0.1:8786", "workers": 2}, tiny_tokenizers, raw)
    assert parallelism(small.runner) == 2  # as the config says: the scheduler is not asked
    assert runner_for(small, todo(15, 100)).options == {"dask_npartitions": 8}
    assert runner_for(small, todo(1)).options == {"dask_npartitions": 8}  # 1 task in 8 pieces
    assert small.runner.options == {}  # the config itself is left as it was
    own = config_with({"kind": "dask", "options": {"dask_partition_size": 4}}, tiny_tokenizers, raw)
    assert runner_for(own, todo(15)).options == {"dask_partition_size": 4}  # the user's choice stands
    local = config_with({"kind": "local", "workers": 2}, tiny_tokenizers, raw)
    assert runner_for(local, todo(15)) == local.runner


def test_the_dask_vq_step_loads_its_model_once_per_process(tiny_tokenizers, tmp_path: Path) -> None:
    vq = shutil.copytree(tiny_tokenizers["image"], tmp_path / "vq")  # its files are touched below
    handler = VQModelHandler(str(vq))
    first, second = _EncodeGroups(handler), _EncodeGroups(handler)
    first.setup()
    second.setup()  # another dask partition in the same worker process
    assert second.model is first.model
    saved = next(p for p in sorted(vq.rglob("*")) if p.is_file())
    stat = saved.stat()
    os.utime(saved, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the tokenizer saved again
    third = _EncodeGroups(handler)
    third.setup()
    assert third.model is not first.model
