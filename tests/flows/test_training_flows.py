"""The train and sft flows under the Prefect test harness: logs streamed, loss-curve and metrics artifacts, resume."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from flows.artifacts import read_metrics
from flows.training_flows import sft, train
from schemas import SFTConfig, TrainConfig, load_config, validate_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stages(train_and_sft_stages: Path) -> Path:
    return train_and_sft_stages


def flow_logs(flow_run_id, until: str) -> list[str]:
    """The run's log messages in the API, once one of them contains `until` (or after ~15 s, for the assertion).

    Prefect ships logs from a background worker in batches: right after a flow returns, its last lines may still
    be queued, so drain the worker and poll instead of reading once.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    deadline = time.monotonic() + 15
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        messages = [log.message for log in logs]
        if any(until in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.25)


@pytest.fixture(scope="module")
def pretrain(prefect_api, stages: Path, tmp_path_factory) -> tuple:
    config = validate_config(
        TrainConfig,
        {
            "model": {"preset": "tiny"},
            "data": str(stages / "stage1"),
            "out_dir": str(tmp_path_factory.mktemp("runs")),
            "seq_len": 128,
            "steps": 4,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "optimizer": {"lr": 3e-3},
            "schedule": {"warmup_steps": 1},
            "checkpoint": {"every_steps": 2},
            "logging": {"every_steps": 1},
        },
    )
    state = train(config=config, run_name="first", return_state=True)
    return state, Path(config.out_dir) / "first"


def test_train_flow_reports_loss_curve_and_final_metrics(prefect_api, pretrain) -> None:
    state, out = pretrain
    assert state.is_completed(), state.message
    result = state.result()
    assert result["steps"] == 4 and result["checkpoint"] == str((out / "checkpoints" / "step-00000004").resolve())
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]

    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    final = {r["metric"]: r["value"] for r in prefect_api.by_key(artifacts, "train-final-metrics")["data"]}
    assert final["step"] == 4 and final["loss"] == pytest.approx(metrics[-1]["loss"])
    assert final["checkpoint"] == result["checkpoint"]
    curve = prefect_api.by_key(artifacts, "train-loss-curve")["data"]
    assert "xychart-beta" in curve and 'x-axis "step" [1, 2, 3, 4]' in curve
    first_line = re.search(r"line \[([^\]]*)\]", curve).group(1)  # the total loss, step by step
    assert [float(v) for v in first_line.split(", ")] == pytest.approx([m["loss"] for m in metrics], abs=1e-4)
    assert "data:image/png;base64," in curve and (out / "loss.png").stat().st_size > 0
    plan = prefect_api.by_key(artifacts, "train-memory-plan")["data"]  # published before the launch
    assert plan.startswith("## Memory per rank") and "tiny" in plan and "on 1 ranks, single, fp32" in plan
    assert "| peak |" in plan and "| activations |" in plan and "128" in plan  # the stage's sequence length

    logs = flow_logs(state.state_details.flow_run_id, "step 4/4 loss")  # the trainer's own lines, streamed
    assert any("step 4/4 loss" in line for line in logs), logs[-10:]


def test_train_flow_runs_both_stages_of_one_config(prefect_api, make_stage, stages: Path, tmp_path: Path) -> None:
    """The flow takes a config with stages (the UI's form has the field) and trains them in turn, one run."""
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(train.fn).model_dump()
    assert "share" in schema["definitions"]["TrainStage"]["properties"]
    config = validate_config(
        TrainConfig,
        {
            "model": {"preset": "tiny"},
            "stages": [
                {"data": str(stages / "stage1"), "share": 0.75},
                {"data": str(make_stage(6_000)), "share": 0.25},
            ],
            "out_dir": str(tmp_path),
            "steps": 4,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "schedule": {"warmup_steps": 1},
            "checkpoint": {"every_steps": 2},
            "eval": {
                "every_steps": 2,
                "heldout": {"val": str(stages / "stage1")},
                "max_batches": 1,
                "benchmarks": ["arc"],
                "benchmark_limit": 2,
            },
        },
    )
    state = train(config=config, return_state=True)
    assert state.is_completed(), state.message
    assert [m["stage"] for m in read_metrics(tmp_path)] == [0, 0, 0, 1]
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    table = prefect_api.by_key(artifacts, "train-stages")["data"]
    assert [(r["stage"], r["steps"], r["share"]) for r in table] == [(1, "1-3", 0.75), (2, "4-4", 0.25)]
    # held-out loss during training, published while the run went and after it (the table's latest version)
    evaluated = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    held_out = [e for e in evaluated if "heldout" in e]
    versions = sorted((a for a in artifacts if a["key"] == "train-heldout-eval"), key=lambda a: a["created"])
    rows = versions[-1]["data"]
    assert [(r["step"], r["held-out stage"], r["loss"]) for r in rows] == [
        (e["step"], "val", e["loss"]) for e in held_out
    ]
    assert [r["step"] for r in rows] == [2, 4]
    curves = sorted((a for a in artifacts if a["key"] == "train-heldout-eval-curve"), key=lambda a: a["created"])
    assert "val loss" in curves[-1]["data"]
    scored = [e for e in evaluated if "benchmark" in e]  # the benchmark, scored by the trainer `cham train` ran
    benchmark = sorted((a for a in artifacts if a["key"] == "train-benchmark-eval"), key=lambda a: a["created"])
    assert [(r["step"], r["benchmark"], r["acc"]) for r in benchmark[-1]["data"]] == [
        (e["step"], "arc", e["metrics"]["acc"]) for e in scored
    ]
    assert [e["step"] for e in scored] == [2, 4]


def test_rerun_resumes_from_latest_checkpoint(prefect_api, pretrain) -> None:
    """A retry relaunches the same command on the same out_dir: the trainer resumes instead of starting over."""
    _, out = pretrain
    again = train(config=load_config(TrainConfig, out / "train-config.yaml"), return_state=True)
    assert again.is_completed(), again.message
    logs = flow_logs(again.state_details.flow_run_id, "nothing to do")
    assert any("resumed from" in line and "step-00000004" in line for line in logs), logs
    assert any("nothing to do: already at step 4" in line for line in logs)
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_sft_flow_under_torchrun(prefect_api, pretrain, stages: Path, tmp_path: Path) -> None:
    _, pretrained = pretrain
    config = validate_config(
        SFTConfig,
        {
            "model": {"preset": "tiny"},
            "data": str(stages / "sft"),
            "out_dir": str(tmp_path / "sft"),
            "seq_len": 128,
            "steps": 3,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "init_from": str(pretrained / "checkpoints"),
            "logging": {
                "every_steps": 1,
                "jsonl": False,
            },  # the flow turns it back on: its artifacts read metrics.jsonl
        },
    )
    state = sft(config=config, nproc_per_node=2, return_state=True)
    assert state.is_completed(), state.message
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    final = {r["metric"]: r["value"] for r in prefect_api.by_key(artifacts, "sft-final-metrics")["data"]}
    metrics = read_metrics(tmp_path / "sft")
    assert final["step"] == 3 == metrics[-1]["step"] and final["lr"] == pytest.approx(metrics[-1]["lr"])
    assert metrics[0]["lr"] == pytest.approx(1e-5)  # SFT's cosine from 1e-5
    logs = flow_logs(state.state_details.flow_run_id, "initialised from")
    assert any(line.startswith("$ python -m flows.train_launcher 2 sft ") for line in logs), logs  # torchrun, 2 ranks
    plan = prefect_api.by_key(artifacts, "sft-memory-plan")["data"]
    assert "on 2 ranks, ddp" in plan
    assert any("initialised from" in line for line in logs)


def test_training_command_for_one_or_several_nodes(tmp_path: Path) -> None:
    from flows.train_launcher import Nodes
    from flows.training_flows import training_command

    config = tmp_path / "c.yaml"
    assert training_command("train", config, 1)[-2:] == ["train", str(config)]  # cham train CONFIG
    launcher = training_command("train", config, 1, Nodes(2, 1, "10.0.0.1:29400"))
    assert launcher[2:6] == ["flows.train_launcher", "1", "train", str(config)]
    assert launcher[6:] == ["--nnodes=2", "--node-rank=1", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=cham"]


def test_plan_markdown_escapes_and_says_whether_it_fits(tmp_path: Path) -> None:
    from flows.training_flows import plan_markdown
    from model.training.memory_plan import parse_memory, plan_memory

    config = validate_config(
        TrainConfig,
        {"model": {"preset": "34b"}, "data": str(tmp_path), "out_dir": str(tmp_path / "o"), "seq_len": 4096}
        | {"steps": 10, "global_batch_size": 64, "schedule": {"warmup_steps": 1}, "parallelism": "fsdp"},
    )
    text = plan_markdown(plan_memory(config, 8, gpu_memory=parse_memory("80GB")))
    assert "does not fit in 72.0 GiB" in text and "| GPU memory | 80.00 | does not fit |" in text
    assert "| --- | ---: | --- |" in text and "1/8 of fp32 weights" in text
