"""Text benchmarks during training: `eval.benchmarks` scored on the training model at `eval.every_steps`, as step
evaluators the trainer records with its held-out loss (model/training/training_eval.py)."""

from __future__ import annotations

from typing import Any

import torch

from model.evaluation.benchmarks.text_benchmarks import run_text_benchmark
from model.evaluation.benchmarks.text_tasks import read_task, resolve_task
from model.tokenizers.text_tokenizer import load_text_tokenizer
from model.training.trainer import Trainer
from model.training.training_eval import StepEvaluator


def benchmark_evaluators(trainer: Trainer) -> list[StepEvaluator]:
    """One step evaluator per `eval.benchmarks` task, scoring `eval.benchmark_limit` questions with the text
    tokenizer the trainer's stage was made with. Task files are read now: a bad one fails before step 0."""
    settings = trainer.config.eval
    if settings is None or not settings.benchmarks:
        return []
    tokenizer = load_text_tokenizer(trainer.loader.manifest["tokenizers"]["text"])
    evaluators = []
    for name in settings.benchmarks:
        path, fewshot = resolve_task(name)
        task = read_task(path)
        pool = list(read_task(fewshot, task.format).docs) if fewshot is not None else None

        def evaluate(model: torch.nn.Module, step: int, task=task, pool=pool) -> list[dict[str, Any]]:
            result = run_text_benchmark(
                model,  # type: ignore[arg-type]
                tokenizer,
                task,
                shots=settings.benchmark_shots,
                limit=settings.benchmark_limit,
                fewshot_pool=pool,
                max_new_tokens=64,  # GSM8K's answers are short; a training-time check must stay cheap
            )
            return [
                {
                    "step": step,
                    "benchmark": result["task"],
                    "questions": result["questions"],
                    "metrics": result["metrics"],
                }
            ]

        evaluators.append(evaluate)
    return evaluators


def attach_benchmarks(trainer: Trainer) -> Trainer:
    """The trainer with its config's benchmarks among its step evaluators (every rank: FSDP2 needs all in a forward)."""
    trainer.evaluators.extend(benchmark_evaluators(trainer))
    return trainer
