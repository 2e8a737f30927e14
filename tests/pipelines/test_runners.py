"""Runner options: the embedded and local runners run a real Beam pipeline over the read tasks."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipelines.raw_records import Reject
from pipelines.runners import pipeline_options
from pipelines.source_reader import plan_read_tasks, read_task
from schemas.prepare_config import RunnerConfig, SourceConfig


def test_options_name_the_runner_explicitly() -> None:
    opts = pipeline_options(RunnerConfig()).get_all_options()
    assert opts["runner"].endswith("FnApiRunner")
    local = pipeline_options(RunnerConfig(kind="local", workers=3)).get_all_options()
    assert (local["runner"], local["direct_running_mode"], local["direct_num_workers"]) == (
        "DirectRunner",
        "multi_processing",
        3,
    )
    dask_options = pipeline_options(RunnerConfig(kind="dask", address="tcp://127.0.0.1:8786"))
    from apache_beam.runners.dask.dask_runner import DaskOptions

    assert dask_options.get_all_options()["runner"].endswith("DaskRunner")
    assert dask_options.view_as(DaskOptions).address == "tcp://127.0.0.1:8786"
    flink = RunnerConfig(kind="beam", options={"runner": "FlinkRunner", "flink_master": "localhost:8081"})
    assert pipeline_options(flink).get_all_options(retain_unknown_options=True)["flink_master"] == "localhost:8081"


@pytest.mark.parametrize("runner", [RunnerConfig(kind="embedded"), RunnerConfig(kind="local", workers=2)])
def test_read_tasks_through_beam(sample_data, runner: RunnerConfig) -> None:
    out, _ = sample_data
    source = SourceConfig(name="prose", kind="text", format="jsonl", paths=[str(out / "text/*.jsonl")])
    tasks = plan_read_tasks(source, jsonl_split_bytes=20_000)
    expected = sorted(r["id"] for t in tasks for r in read_task(t) if not isinstance(r, Reject))
    with beam.Pipeline(options=pipeline_options(runner)) as p:
        ids = p | beam.Create(tasks) | beam.Reshuffle() | beam.FlatMap(read_task) | beam.Map(lambda r: r["id"])
        assert_that(ids, equal_to(expected))
    assert len(expected) == 130
