"""One pretraining run across two stages: one lr schedule over both, the optimizer carried over, the loader switching
at the boundary; exact when resumed at the boundary or inside stage 2; the wrong stage, a stage re-mixed since, other
shares and other steps refused on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.files import step_folder
from model.training.checkpointing import CheckpointError
from model.training.lr_schedule import lr_at
from model.training.trainer import Trainer
from schemas import ConfigError, TrainConfig, validate_config

STEPS = 10  # stage 1: steps 1-8 (80%), stage 2: steps 9-10 (20%), as Chameleon splits them


def mix(prepared_sources: Path, out: Path, seed: int = 1, seq_len: int = 128) -> Path:
    from pipelines.mix_job import run_mix
    from schemas import MixtureSpec

    sources = [
        {"name": "prose", "path": str(prepared_sources / "prose"), "weight": 1},
        {"name": "photos", "path": str(prepared_sources / "photos"), "weight": 1},
    ]
    stages = {
        "stage1": {"tokens": 12_000, "sources": sources},
        # Stage 2 halves stage 1's sources and adds the how-to documents.
        "stage2": {
            "tokens": 6_000,
            "inherit": {"stage": "stage1", "factor": 0.5},
            "sources": [{"name": "howto", "path": str(prepared_sources / "howto"), "weight": 1}],
        },
    }
    spec = {"seq_len": seq_len, "tokens_per_image": 64, "max_repetitions": 16, "seed": seed, "stages": stages}
    run_mix(validate_config(MixtureSpec, spec), out, sequences_per_shard=32)
    return out


@pytest.fixture(scope="module")
def mixed(prepared_sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mix(prepared_sources, tmp_path_factory.mktemp("two_stages"))


def config(out: Path, stages: list[tuple[Path, float]] | None = None, data: Path | None = None, **changes):
    fields = {
        "model": {"preset": "tiny"},
        "out_dir": str(out),
        "steps": STEPS,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every_steps": 1, "keep_last": 20},
        "logging": {"every_steps": 1, "tensorboard": False},
    }
    if stages is not None:
        fields["stages"] = [{"data": str(d), "share": share} for d, share in stages]
    if data is not None:
        fields["data"] = str(data)
    return validate_config(TrainConfig, fields | changes)


def two_stages(mixed: Path) -> list[tuple[Path, float]]:
    return [(mixed / "stage1", 0.8), (mixed / "stage2", 0.2)]


def run(cfg: TrainConfig, stop_at: int | None = None) -> list[str]:
    logged: list[str] = []
    Trainer(cfg, log=logged.append).train(stop_at=stop_at)
    return logged


def final(out: Path) -> dict[str, torch.Tensor]:
    return step_folder.read_weights(out / "checkpoints" / f"step-{STEPS:08d}", CheckpointError)


@pytest.fixture(scope="module")
def straight(mixed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    logged = run(config(out, two_stages(mixed)))
    assert f"stage 2/2 (stage2) from step 8: {mixed / 'stage2'}" in logged
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_schedule_spans_both_stages_and_the_optimizer_carries_over(mixed: Path, straight: Path, tmp_path) -> None:
    records = metrics(straight)
    assert [r["stage"] for r in records] == [0] * 8 + [1] * 2
    cfg = config(tmp_path, two_stages(mixed))
    assert [r["lr"] for r in records] == pytest.approx([lr_at(s, STEPS, 3e-3, cfg.schedule) for s in range(STEPS)])
    assert records[-1]["lr"] == 0.0 and records[8]["lr"] > 0  # no second warm-up at the boundary
    # Stage 1's steps are those of a run on stage 1 alone with the same schedule; stage 2's read other data.
    alone = tmp_path / "alone"
    run(config(alone, data=mixed / "stage1"), stop_at=9)
    solo = metrics(alone)
    assert [r["loss"] for r in records[:8]] == [r["loss"] for r in solo[:8]]
    assert records[8]["supervised_tokens"] != solo[8]["supervised_tokens"]
    last = straight / "checkpoints" / f"step-{STEPS:08d}"
    optimizer = step_folder.read_trainer(last, CheckpointError)["optimizer"]
    assert {int(s["step"]) for s in optimizer["state"].values()} == {STEPS}  # one AdamW, never reset
    training = step_folder.read_training_record(last, CheckpointError)
    assert training == {"kind": "pretrain", "data": str(mixed / "stage2"), "stage": "stage2"}


@pytest.mark.parametrize("stop_at", [8, 9])  # at the boundary, inside stage 2
def test_a_resume_in_either_stage_is_exact(mixed: Path, straight: Path, tmp_path: Path, stop_at: int) -> None:
    out = tmp_path / "run"
    run(config(out, two_stages(mixed)), stop_at=stop_at)
    logged = run(config(out, two_stages(mixed)))
    assert f"resumed from {out / 'checkpoints' / f'step-{stop_at:08d}'} at step {stop_at}" in logged
    assert (f"stage 2/2 (stage2) from step 8: {mixed / 'stage2'}" in logged) == (stop_at == 8)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(straight)]
    expected = final(straight)
    assert all(torch.equal(final(out)[k], v) for k, v in expected.items())


def test_the_wrong_stage_or_a_remixed_one_is_refused(mixed: Path, prepared_sources: Path, tmp_path: Path) -> None:
    # A single-stage run on stage 1, pointed at stage 2 of the same mix (the same dataset fingerprint).
    single = tmp_path / "single"
    run(config(single, data=mixed / "stage1"), stop_at=2)
    with pytest.raises(CheckpointError, match=r"stage 1 of the run was 'stage1' .* this config's is 'stage2'"):
        Trainer(config(single, data=mixed / "stage2"), log=lambda _: None)
    # A two-stage run inside stage 2 whose stage 1 was re-mixed since (another seed: other sequences).
    out = tmp_path / "two"
    run(config(out, two_stages(mixed)), stop_at=9)
    remixed = mix(prepared_sources, tmp_path / "remixed", seed=2)
    with pytest.raises(CheckpointError, match=r"stage 1 of the run was 'stage1' .* re-mixed since"):
        Trainer(config(out, [(remixed / "stage1", 0.8), (mixed / "stage2", 0.2)]), log=lambda _: None)
    with pytest.raises(CheckpointError, match=r"stages span steps \[\(0, 8\), \(8, 10\)\], this config's \[\(0, 5\)"):
        Trainer(config(out, [(mixed / "stage1", 0.5), (mixed / "stage2", 0.5)]), log=lambda _: None)


def test_other_steps_on_resume_are_refused_or_replanned_when_asked(mixed: Path, tmp_path: Path) -> None:
    run(config(tmp_path, two_stages(mixed)), stop_at=3)
    with pytest.raises(CheckpointError, match=r"from a run of 10 steps, whose lr schedule ends at step 10; .* 12"):
        Trainer(config(tmp_path, two_stages(mixed), steps=12), log=lambda _: None)
    logged: list[str] = []
    replanned = config(tmp_path, two_stages(mixed), steps=12, replan_on_resume=True)
    trainer = Trainer(replanned, log=logged.append)
    assert trainer.step == 3 and any("re-planned on resume" in line and "10 -> 12 steps" in line for line in logged)
    history = trainer.train()
    # The new schedule from step 3 on (its lr, not the old run's), stage 2 from round(12 x 0.8) = 10.
    assert [m.lr for m in history] == pytest.approx([lr_at(s, 12, 3e-3, replanned.schedule) for s in range(3, 12)])
    assert [m.stage for m in history] == [0] * 7 + [1] * 2


def test_stage_configs_are_checked(mixed: Path, tmp_path: Path) -> None:
    stage1, stage2 = mixed / "stage1", mixed / "stage2"
    with pytest.raises(ConfigError, match=r"shares must add up to 1, they add up to 0.9"):
        config(tmp_path, [(stage1, 0.7), (stage2, 0.2)])
    with pytest.raises(ConfigError, match=r"give either data .* or stages"):
        config(tmp_path, [(stage1, 1.0)], data=stage1)
    with pytest.raises(ConfigError, match=r"give either data .* or stages"):
        config(tmp_path)
    with pytest.raises(ConfigError, match=r"stages \[1\] get no step of 10"):
        config(tmp_path, [(stage1, 0.99), (stage2, 0.01)])
    plan = config(tmp_path, [(stage1, 0.8), (stage2, 0.2)], steps=7).stage_plan()
    assert [(p.first_step, p.end_step) for p in plan] == [(0, 6), (6, 7)]  # round(5.6) = 6


def test_stages_of_another_sequence_length_are_refused(mixed: Path, make_stage, tmp_path: Path) -> None:
    short = make_stage(6_000, seq_len=96)
    with pytest.raises(ValueError, match=r"has sequences of 96, the run's first stage .* 128: mix every stage"):
        Trainer(config(tmp_path, [(mixed / "stage1", 0.5), (short, 0.5)]), log=lambda _: None)
