"""The trainer on the sample stage: losses fall, resume is exact, non-finite steps are not applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.trainer import Trainer
from schemas import TrainConfig, validate_config


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(30_000)


def config(stage: Path, out: Path, steps: int, **changes) -> TrainConfig:
    data = {"model": {"preset": "tiny"}, "data": str(stage), "out_dir": str(out), "seq_len": 128, "steps": steps,
            "global_batch_size": 8, "micro_batch_size": 4, "optimizer": {"lr": 3e-3},
            "schedule": {"kind": "warmup_exponential", "warmup_steps": 3},
            "checkpoint": {"every_steps": 5, "keep_last": 2}, "logging": {"every_steps": 5}} | changes  # fmt: skip
    return validate_config(TrainConfig, data)


def test_text_and_image_losses_fall(stage: Path, tmp_path: Path) -> None:
    history = Trainer(config(stage, tmp_path, 40), log=lambda _: None).train()
    first, last = history[0], history[-1]
    # From about ln(2048) = 7.6 nats, 40 tiny steps take both modalities well down.
    assert last.ce_text < first.ce_text - 0.7 and last.ce_image < first.ce_image - 0.5
    assert first.loss > first.ce and abs(first.z_loss - (first.loss - first.ce)) < 1e-4  # z-loss is in the loss
    assert history[-1].lr == 0.0 or history[-1].lr < history[5].lr  # exponential decay to 0 at the last step
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[-1])["step"] == 40
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000040"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/ce_image")) == 40 and "train/tokens_per_s" in events.Tags()["scalars"]


def test_resume_is_exact(stage: Path, tmp_path: Path) -> None:
    straight = Trainer(config(stage, tmp_path / "a", 10), log=lambda _: None)
    straight.train()
    first = Trainer(config(stage, tmp_path / "b", 10), log=lambda _: None)
    first.train(stop_at=5)  # as if the job died after the step-5 checkpoint
    resumed = Trainer(config(stage, tmp_path / "b", 10), log=lambda _: None)
    assert resumed.step == 5
    resumed.train()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_non_finite_step_is_not_applied(stage: Path, tmp_path: Path) -> None:
    trainer = Trainer(config(stage, tmp_path, 6), log=lambda _: None)
    trainer.train(stop_at=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hook = trainer.model.output.weight.register_hook(lambda g: g * float("nan"))
    metrics = trainer.train(stop_at=2)[-1]
    hook.remove()
    assert metrics.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.train()[-1].skipped_steps == 1  # later steps apply again


def test_config_mismatches_are_clear(stage: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has sequences of 128, config\.seq_len is 256"):
        Trainer(config(stage, tmp_path, 10, seq_len=256), log=lambda _: None)
    # FlexAttention has no CPU backward: asking for it on CPU fails before any step.
    with pytest.raises(ValueError, match="document_attention 'flex' needs a CUDA device"):
        Trainer(config(stage, tmp_path, 10, document_attention="flex"), log=lambda _: None)
    assert Trainer(config(stage, tmp_path, 10, document_attention="sdpa"), log=print).model.document_attention == "sdpa"
