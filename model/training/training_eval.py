"""Evaluation during training: every `eval.every_steps` steps (and at the last), held-out loss on each held-out
stage, overall, per modality and per source, and any step evaluators the trainer was given (the text benchmarks of
model/evaluation/benchmarks/during_training.py), recorded in `eval.jsonl` (one record per stage or benchmark and
evaluation), TensorBoard (`eval/<name>/...`) and the console. Every rank evaluates the same batches (under FSDP2
each forward gathers the shards, so all ranks must take part); rank 0 records."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from model.files.reading import read_json_object
from model.training.held_out import heldout_loss
from model.training.metrics import TENSORBOARD_DIR, keep_metrics_until
from schemas.train_config import TrainingEval

EVAL_FILE = "eval.jsonl"
# A step evaluator: (model, step) -> eval.jsonl records, each with "step", "benchmark" and its "metrics".
StepEvaluator = Callable[[torch.nn.Module, int], list[dict[str, Any]]]


def eval_record(step: int, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The eval.jsonl record of one held-out stage's evaluation at `step`."""
    return {
        "step": step,
        "heldout": name,
        "loss": result["loss"],
        "text": result["by_modality"]["text"]["loss"],
        "image": result["by_modality"]["image"]["loss"],
        "tokens": result["tokens"],
        "by_source": {source: r["loss"] for source, r in result["by_source"].items()},
    }


class HeldOutEvaluator:
    """Evaluates the training model on the held-out stages at the configured steps."""

    def __init__(
        self,
        settings: TrainingEval,
        batch_size: int,
        document_masking: bool,
        out_dir: Path,
        resumed_step: int,
        writes_files: bool,
        tensorboard: bool,
        log: Callable[[str], None],
        evaluators: Sequence[StepEvaluator] = (),
    ):
        self.settings, self.log, self.document_masking = settings, log, document_masking
        self.evaluators = list(evaluators)
        self.batch_size = settings.batch_size or batch_size
        self.file = self.writer = None
        if writes_files:
            path = Path(out_dir) / EVAL_FILE
            keep_metrics_until(path, resumed_step)  # a resumed run evaluates the redone steps again
            self.file = path.open("a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR), purge_step=resumed_step + 1)

    @staticmethod
    def check(settings: TrainingEval, vocab_size: int) -> None:
        """Before step 0: every held-out stage is a stage folder of the model's vocabulary."""
        for name, stage in settings.heldout.items():
            manifest = read_json_object(Path(stage) / "manifest.json", ("vocab_layout",), what=f"heldout {name!r}")
            if manifest["vocab_layout"]["vocab_size"] != vocab_size:
                raise ValueError(
                    f"eval.heldout {name!r} ({stage}): its vocabulary has {manifest['vocab_layout']['vocab_size']} "
                    f"ids, the model {vocab_size}"
                )

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.settings.every_steps == 0 or step == total_steps

    def evaluate(self, model: torch.nn.Module, step: int, device: torch.device) -> list[dict[str, Any]]:
        """Held-out loss of every stage at `step`; recorded on rank 0; returns the records."""
        records = []
        for name, stage in self.settings.heldout.items():
            result = heldout_loss(
                model,
                stage,
                batch_size=self.batch_size,
                max_batches=self.settings.max_batches,
                device=device,
                document_masking=self.document_masking,
            )
            record = eval_record(step, name, result)
            records.append(record)
            text, image = (f"{v:.4f}" if v is not None else "-" for v in (record["text"], record["image"]))
            self.log(f"eval step {step} {name}: loss {record['loss']:.4f} (text {text}, image {image})")
            self._record(
                record,
                {
                    **{f"eval/{name}/{part}": record[part] for part in ("loss", "text", "image")},
                    **{f"eval/{name}/source/{s}": loss for s, loss in record["by_source"].items()},
                },
                step,
            )
        for evaluator in self.evaluators:
            for record in evaluator(model, step):
                records.append(record)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items() if not k.endswith("_stderr"))
                self.log(f"eval step {step} {record['benchmark']}: {shown}")
                scalars = {f"eval/{record['benchmark']}/{k}": v for k, v in record["metrics"].items()}
                self._record(record, scalars, step)
        return records

    def _record(self, record: dict[str, Any], scalars: dict[str, float | None], step: int) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
