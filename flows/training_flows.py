"""The `train` and `sft` flows: torchrun (or one process) as a subprocess, logs streamed, resumed on retry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from pydantic import Field

from flows.artifacts import (
    loss_points,
    markdown_artifact,
    mermaid_lines,
    plot_loss_curves,
    png_markdown,
    read_metrics,
    table_artifact,
)
from flows.markup import code, md
from flows.subprocess_task import cham, run_command, torchrun
from model.training.checkpointing import latest_checkpoint
from schemas import SFTConfig, TrainConfig, dump_config

NPROC = Field(1, description="processes (ranks) on this machine; more than 1 launches torchrun (DDP or FSDP)")
RUN_NAME = Field(None, description="train into OUT_DIR/RUN_NAME (e.g. one folder per dataset build)")
RETRIES = Field(2, description="relaunches after a failure; each resumes from the latest checkpoint")


def training_command(kind: str, config_file: Path, nproc_per_node: int) -> list[str]:
    """`cham train|sft CONFIG` for one process, torchrun with N processes running flows.train_worker otherwise."""
    return cham(kind, str(config_file)) if nproc_per_node == 1 else torchrun(nproc_per_node, kind, config_file)


@task(name="launch-training", retry_delay_seconds=10)
def launch_training(kind: str, config: TrainConfig, nproc_per_node: int) -> dict[str, Any]:
    """Run the trainer to config.steps; a relaunch (a retry) resumes from out_dir/checkpoints/latest by itself."""
    out_dir = Path(config.out_dir)
    config_file = dump_config(config, out_dir / f"{kind}-config.yaml")
    run_command(training_command(kind, config_file, nproc_per_node))
    metrics = read_metrics(out_dir)
    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    return {
        "out_dir": str(out_dir),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "steps": metrics[-1]["step"] if metrics else 0,
        "final": metrics[-1] if metrics else {},
        "loss_curve": loss_points(metrics),
    }


def report_training(kind: str, result: dict[str, Any]) -> None:
    """Artifacts: the loss curve (mermaid chart and PNG) and a table of the final metrics."""
    out_dir = Path(result["out_dir"])
    metrics = read_metrics(out_dir)
    series = {
        "loss": loss_points(metrics),
        "text CE": loss_points(metrics, "ce_text"),
        "image CE": loss_points(metrics, "ce_image"),
    }
    # A CE with no value at any step (null: no targets of that modality; 0.0 from older trainers) is not drawn.
    series = {k: v for k, v in series.items() if any(y for _, y in v)}
    png = plot_loss_curves(series, out_dir / "loss.png", title=f"{kind}: {out_dir.name}")
    markdown_artifact(
        md(
            "## {}: loss by step\n\n{}\n\n{}\n\nRun folder: {}; metrics: {}.",
            kind,
            mermaid_lines(f"{kind} loss", series),
            png_markdown(png, "loss curves"),
            code(out_dir),
            code(out_dir / "metrics.jsonl"),
        ),
        key=f"{kind}-loss-curve",
        description=f"{kind} loss curves",
    )
    final = result["final"]
    rows = [{"metric": k, "value": v} for k, v in final.items() if v is not None]
    rows.append({"metric": "checkpoint", "value": result["checkpoint"]})
    table_artifact(rows, key=f"{kind}-final-metrics", description=f"{kind}: metrics of the last step")


def _train(kind: str, config: TrainConfig, nproc_per_node: int, run_name: str | None, retries: int) -> dict:
    if run_name:
        config = config.model_copy(update={"out_dir": Path(config.out_dir) / run_name})
    if not config.logging.jsonl:  # the flow's result and artifacts are read from metrics.jsonl
        get_run_logger().warning("logging.jsonl is off in the config; the flow turns it on for its loss curves")
        config = config.model_copy(update={"logging": config.logging.model_copy(update={"jsonl": True})})
    result = launch_training.with_options(retries=retries)(kind, config, nproc_per_node)
    report_training(kind, result)
    return {k: v for k, v in result.items() if k != "loss_curve"}


@flow(name="train")
def train(
    config: TrainConfig,
    nproc_per_node: Annotated[int, Field(ge=1)] = NPROC,
    run_name: str | None = RUN_NAME,
    retries: Annotated[int, Field(ge=0)] = RETRIES,
) -> dict[str, Any]:
    """Pretrain on a stage written by the mix job; artifacts: loss curves and final metrics."""
    return _train("train", config, nproc_per_node, run_name, retries)


@flow(name="sft")
def sft(
    config: SFTConfig,
    nproc_per_node: Annotated[int, Field(ge=1)] = NPROC,
    run_name: str | None = RUN_NAME,
    retries: Annotated[int, Field(ge=0)] = RETRIES,
) -> dict[str, Any]:
    """Supervised fine-tuning from a pretrained checkpoint; artifacts: loss curves and final metrics."""
    return _train("sft", config, nproc_per_node, run_name, retries)
