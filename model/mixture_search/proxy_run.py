"""One proxy run's training and evaluation: a short pretraining on a mixture's stage, then held-out loss on each
held-out stage, read out as the search's objectives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.training.held_out import heldout_loss
from model.training.trainer import Trainer
from schemas.train_config import TrainConfig


def objective_values(evaluations: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Every objective a search may name, from held-out evaluations: `<name>.loss`, `<name>.text`, `<name>.image`
    and `<name>.source.<source>`; a part with no supervised tokens is left out."""
    out: dict[str, float] = {}
    for name, result in evaluations.items():
        parts = {
            "loss": result["loss"],
            **{m: v["loss"] for m, v in result["by_modality"].items()},
            **{f"source.{s}": v["loss"] for s, v in result["by_source"].items()},
        }
        out |= {f"{name}.{part}": float(loss) for part, loss in parts.items() if loss is not None}
    return out


def train_and_evaluate(
    config: TrainConfig,
    heldout: dict[str, str | Path],
    eval_batch_size: int = 16,
    eval_max_batches: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `config` in this process (one rank), then evaluate the trained model on every held-out stage."""
    trainer = Trainer(config, log=log)
    metrics = trainer.train()
    evaluations = {
        name: heldout_loss(trainer.module, stage, batch_size=eval_batch_size, max_batches=eval_max_batches)
        for name, stage in heldout.items()
    }
    final = metrics[-1] if metrics else None
    return {
        "steps": config.steps,
        "final_train_loss": float(final.loss) if final is not None else None,
        "heldout": {
            name: {k: v for k, v in e.items() if k in ("loss", "tokens", "by_modality", "by_source", "fingerprint")}
            for name, e in evaluations.items()
        },
        "objectives": objective_values(evaluations),
    }
