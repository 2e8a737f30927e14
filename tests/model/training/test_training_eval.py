"""Held-out loss during training: at the configured steps, by value equal to evaluating the model of that step,
recorded once per step across a resume, and a wrong held-out stage refused before step 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.training.held_out import heldout_loss
from model.training.trainer import Trainer
from schemas import TrainConfig, validate_config
from tests.model.training.test_trainer import tensorboard_scalars


@pytest.fixture(scope="module")
def stages(make_stage) -> tuple[Path, Path]:
    return make_stage(30_000), make_stage(3_000, prose_weight=3.0)


def config(stage: Path, heldout: Path, out: Path, steps: int, **changes) -> TrainConfig:
    data = {
        "model": {"preset": "tiny"},
        "data": str(stage),
        "out_dir": str(out),
        "steps": steps,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
        "eval": {"every_steps": 2, "heldout": {"val": str(heldout)}, "max_batches": 2},
    } | changes
    return validate_config(TrainConfig, data)


def test_held_out_loss_is_recorded_at_every_nth_step_by_value(stages, tmp_path: Path) -> None:
    stage, heldout = stages
    lines: list[str] = []
    trainer = Trainer(config(stage, heldout, tmp_path / "run", 5), log=lines.append)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["heldout"]) for r in records] == [(2, "val"), (4, "val"), (5, "val")]  # and the last step
    final = heldout_loss(trainer.module, heldout, batch_size=4, max_batches=2)
    assert records[-1]["loss"] == pytest.approx(final["loss"], rel=1e-9)
    assert records[-1]["text"] == pytest.approx(final["by_modality"]["text"]["loss"], rel=1e-9)
    assert records[-1]["image"] == pytest.approx(final["by_modality"]["image"]["loss"], rel=1e-9)
    assert set(records[-1]["by_source"]) == {"prose", "photos"}
    assert records[0]["loss"] > records[-1]["loss"]  # it learns
    assert any(line.startswith("eval step 4 val: loss ") for line in lines)
    points = tensorboard_scalars(tmp_path / "run" / "tensorboard", "eval/val/loss")
    assert points == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]


def test_a_resumed_run_evaluates_each_step_once(stages, tmp_path: Path) -> None:
    stage, heldout = stages
    whole = tmp_path / "whole"
    Trainer(config(stage, heldout, whole, 6), log=lambda _: None).train()
    run = tmp_path / "run"
    Trainer(config(stage, heldout, run, 6), log=lambda _: None).train(stop_at=5)  # died after the step-4 save
    resumed = Trainer(config(stage, heldout, run, 6), log=lambda _: None)
    assert resumed.step == 4
    resumed.train()
    got = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (whole / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [2, 4, 6]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)


def test_a_held_out_stage_of_another_vocabulary_is_refused_before_step_0(stages, tmp_path: Path) -> None:
    stage, heldout = stages
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((heldout / "manifest.json").read_text())
    manifest["vocab_layout"]["vocab_size"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"eval\.heldout 'val'.*its vocabulary has"):
        Trainer(config(stage, other, tmp_path / "run", 4), log=lambda _: None)
    assert not (tmp_path / "run" / "eval.jsonl").exists()
