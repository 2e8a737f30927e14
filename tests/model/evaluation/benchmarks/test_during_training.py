"""Text benchmarks during training: scored at eval.every_steps on the training model, by value equal to scoring the
model of that step, recorded in eval.jsonl beside held-out loss; a bad task fails before step 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.evaluation.benchmarks.during_training import attach_benchmarks
from model.evaluation.benchmarks.text_benchmarks import run_text_benchmark
from model.evaluation.benchmarks.text_tasks import TaskFileError, read_task, resolve_task
from model.tokenizers.text_tokenizer import load_text_tokenizer
from model.training.trainer import Trainer
from schemas import TrainConfig, validate_config


def config(stage: Path, out: Path, **eval_settings) -> TrainConfig:
    return validate_config(
        TrainConfig,
        {
            "model": {"preset": "tiny"},
            "data": str(stage),
            "out_dir": str(out),
            "steps": 3,
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "schedule": {"warmup_steps": 1},
            "eval": {"every_steps": 2, **eval_settings},
        },
    )


def test_benchmarks_are_scored_at_the_eval_steps(make_stage, tmp_path: Path) -> None:
    stage = make_stage(6_000)
    lines: list[str] = []
    trainer = attach_benchmarks(
        Trainer(config(stage, tmp_path / "run", benchmarks=["arc"], benchmark_limit=3), log=lines.append)
    )
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["benchmark"], r["questions"]) for r in records] == [(2, "arc", 3), (3, "arc", 3)]
    tokenizer = load_text_tokenizer(trainer.loader.manifest["tokenizers"]["text"])
    path, fewshot = resolve_task("arc")
    task = read_task(path)
    pool = list(read_task(fewshot, task.format).docs) if fewshot else None
    final = run_text_benchmark(trainer.module, tokenizer, task, shots=0, limit=3, fewshot_pool=pool)
    assert records[-1]["metrics"] == pytest.approx(final["metrics"])
    assert any(line.startswith("eval step 3 arc: acc ") for line in lines)


def test_an_unknown_task_fails_before_step_0(make_stage, tmp_path: Path) -> None:
    trainer = Trainer(config(make_stage(6_000), tmp_path / "run", benchmarks=["no-such-task"]), log=lambda _: None)
    with pytest.raises(TaskFileError, match="no-such-task"):
        attach_benchmarks(trainer)


def test_eval_needs_something_to_evaluate(make_stage, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"held-out stages \(heldout\) or benchmarks"):
        config(make_stage(6_000), tmp_path / "run")
