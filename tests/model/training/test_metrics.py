"""The metrics sinks: the console line, metrics.jsonl and TensorBoard each record a step's metrics as the trainer
did inline before (null for a modality without targets, rank-0 files, a resumed run's redone steps recorded once)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from model.training.metrics import (
    ConsoleSink,
    JsonlSink,
    StepMetrics,
    TensorBoardSink,
    close_sinks,
    console_line,
    keep_metrics_until,
    open_sinks,
)
from schemas.train_config import LoggingConfig

STEP = StepMetrics(
    step=1,
    loss=7.5,
    ce=7.25,
    ce_text=7.0,
    ce_image=None,
    z_loss=1.5e-4,
    grad_norm=1.25,
    lr=3e-3,
    tokens=1024,
    supervised_tokens=1000,
    tokens_per_s=12345.6,
    data_wait_share=0.125,
    mfu=None,
    skipped_steps=0,
)


def steps(n: int) -> list[StepMetrics]:
    return [replace(STEP, step=s, loss=STEP.loss - s / 10) for s in range(1, n + 1)]


def test_console_line_carries_every_figure_and_a_dash_for_no_targets() -> None:
    assert console_line(STEP, 40) == (
        "step 1/40 loss 7.5000 (text 7.000, image -, z 1.50e-04) grad 1.25 lr 3.00e-03 12,346 tok/s data wait 12%"
    )


def test_console_sink_every_n_steps_and_the_last() -> None:
    logged: list[str] = []
    sink = ConsoleSink(logged.append, every_steps=3, total_steps=7)
    for m in steps(7):
        sink.write(m)
    sink.close()
    assert [line.split()[1] for line in logged] == ["3/7", "6/7", "7/7"]


def test_jsonl_sink_appends_one_record_per_step_and_drops_the_redone_ones(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path, resumed_step=0)
    for m in steps(4):
        sink.write(m)
        assert len(path.read_text().splitlines()) == m.step  # flushed at once: a reader sees each step
    sink.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["ce_image"] is None and records[0]["ce_text"] == 7.0 and records[3]["loss"] == pytest.approx(7.1)
    with path.open("a") as f:
        f.write('{"step": 5, "lo')  # cut short by a kill
    sink = JsonlSink(path, resumed_step=2)  # resumed from the step-2 checkpoint: 3 and 4 are redone
    sink.write(steps(3)[2])
    sink.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert keep_metrics_until(path, 3) == 0 and keep_metrics_until(tmp_path / "none.jsonl", 1) == 0


def test_tensorboard_sink_skips_none_and_purges_redone_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path, resumed_step=0)
    for m in steps(4):
        sink.write(m)
    sink.close()
    sink = TensorBoardSink(tmp_path, resumed_step=2)
    for m in steps(4)[2:]:
        sink.write(replace(m, loss=1.0))
    sink.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    points = events.Scalars("train/loss")
    assert [e.step for e in points] == [1, 2, 3, 4]
    assert [e.value for e in points] == pytest.approx([7.4, 7.3, 1.0, 1.0])  # 3 and 4 as redone
    assert "train/ce_image" not in events.Tags()["scalars"] and "train/step" not in events.Tags()["scalars"]


def test_open_sinks_by_config_and_rank(tmp_path: Path) -> None:
    every = LoggingConfig()
    names = [type(s).__name__ for s in open_sinks(every, tmp_path, 0, 10, print, writes_files=True)]
    assert names == ["ConsoleSink", "JsonlSink", "TensorBoardSink"]
    others = open_sinks(every, tmp_path / "rank1", 0, 10, print, writes_files=False)  # not rank 0: no files
    assert [type(s).__name__ for s in others] == ["ConsoleSink"] and not (tmp_path / "rank1").exists()
    off = LoggingConfig(jsonl=False, tensorboard=False)
    assert [type(s).__name__ for s in open_sinks(off, tmp_path, 0, 10, print, writes_files=True)] == ["ConsoleSink"]


def test_every_sink_is_closed_even_when_one_fails() -> None:
    closed: list[str] = []

    class Sink:
        def __init__(self, name: str, fails: bool = False):
            self.name, self.fails = name, fails

        def write(self, metrics: StepMetrics) -> None:
            pass

        def close(self) -> None:
            closed.append(self.name)
            if self.fails:
                raise OSError(f"{self.name}: disk full")

    with pytest.raises(OSError, match="a: disk full"):
        close_sinks([Sink("a", fails=True), Sink("b"), Sink("c", fails=True)])
    assert closed == ["a", "b", "c"]
